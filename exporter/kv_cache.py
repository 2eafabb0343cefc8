"""Static KV cache and the attention that reads it.

The cache is two buffers of shape [1, max_seq_len, n_kv_heads, head_dim], allocated once
and written in place at ``start_pos``; torch.export turns them into mutable buffers that
ExecuTorch plans once, so no cache tensor is copied in or out per step.

Two implementations of each half, chosen by the recipe (kv_cache.attention / cache_update):
- ``custom_sdpa`` / ``custom``: ExecuTorch's ``llama::custom_sdpa`` (reads only the first
  start_pos + seq_len cache rows, handles grouped-query attention without repeating K/V)
  and ``llama::update_cache`` (an in-place row write). Measured faster, see docs/benchmarks.md.
- ``sdpa`` / ``index_copy``: portable aten ops (masked SDPA over the whole cache with
  ``enable_gqa``; ``index_copy_``), the baseline the custom ops were to be measured against.
  Correct in eager torch. The executorch target runs aten SDPA (with llama::update_cache)
  but refuses index_copy_, whose program aborts the ExecuTorch 1.5.1 runtime
  (docs/targets/executorch.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def load_custom_ops() -> None:
    """Register ExecuTorch's llama:: ops with torch (for eager runs and for export)."""
    from exporter.errors import require

    require("executorch.extension.llm.custom_ops.custom_ops", "executorch")


class StaticKVCache(nn.Module):
    def __init__(self, max_seq_len: int, n_kv_heads: int, head_dim: int, *, cache_update: str) -> None:
        super().__init__()
        shape = (1, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
        self.cache_update = cache_update

    def reset_buffers(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def update(self, start_pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([1, seq, n_kv, head_dim]) at rows start_pos.. and return the caches."""
        if self.cache_update == "custom":
            torch.ops.llama.update_cache(k, self.k_cache, start_pos)
            torch.ops.llama.update_cache(v, self.v_cache, start_pos)
        else:
            positions = torch.arange(k.shape[1], dtype=torch.long) + start_pos
            self.k_cache.index_copy_(1, positions, k)
            self.v_cache.index_copy_(1, positions, v)
        return self.k_cache, self.v_cache


class CachedAttention(nn.Module):
    """Causal attention of q ([1, seq, n_heads, head_dim]) over the cache, output [1, seq, n_heads*head_dim]."""

    def __init__(self, max_seq_len: int, n_heads: int, n_kv_heads: int, head_dim: int, *, attention: str) -> None:
        super().__init__()
        self.attention = attention
        self.scale = head_dim**-0.5
        if attention == "sdpa":
            self.register_buffer("mask", torch.empty(max_seq_len, max_seq_len), persistent=False)
            self.reset_buffers()

    def reset_buffers(self) -> None:
        if self.attention == "sdpa":
            # Row i of the mask is what position i may see: 0 up to i, -inf after.
            n = self.mask.shape[0]
            self.mask.copy_(torch.full((n, n), float("-inf"), device=self.mask.device).triu(1))

    def forward(self, q, k_cache, v_cache, start_pos) -> torch.Tensor:
        bsz, seq_len, n_heads, head_dim = q.shape
        if self.attention == "custom_sdpa":
            out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start_pos, None, 0.0, True, self.scale)
        else:
            mask = self.mask.narrow(0, start_pos, seq_len)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                attn_mask=mask, scale=self.scale, enable_gqa=True,
            ).transpose(1, 2)
        return out.reshape(bsz, seq_len, n_heads * head_dim)
