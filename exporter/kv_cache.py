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

``kv_cache.dtype = "int8"`` (executorch): ``Int8KVCache`` with ``llama::custom_quantized_sdpa``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

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
        # (key, value) scales [n_kv, head_dim]: what is written is rounded to that static int8
        # grid first, as an int8 cache with fixed scales stores it (quant/kv_scales.py).
        self.static_scales: tuple[torch.Tensor, torch.Tensor] | None = None
        # Called with (k, v) on every write (quant/kv_scales.py's calibration), or None.
        self.observer: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def reset_buffers(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def update(self, start_pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([1, seq, n_kv, head_dim]) at rows start_pos.. and return the caches."""
        if self.observer is not None:
            self.observer(k, v)
        if self.static_scales is not None:
            k, v = (round_to_int8_grid(x, scale) for x, scale in zip((k, v), self.static_scales, strict=True))
        if self.cache_update == "custom":
            torch.ops.llama.update_cache(k, self.k_cache, start_pos)
            torch.ops.llama.update_cache(v, self.v_cache, start_pos)
        else:
            positions = torch.arange(k.shape[1], dtype=torch.long) + start_pos
            self.k_cache.index_copy_(1, positions, k)
            self.v_cache.index_copy_(1, positions, v)
        return self.k_cache, self.v_cache


def round_to_int8_grid(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x on the symmetric int8 grid of ``scale`` (broadcast over the last dims): codes
    round half to even and saturate at -128 and 127, as onnxruntime's int8 cache stores them."""
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


class Int8KVCache(nn.Module):
    """The cache as int8 codes with a float32 scale and an int8 zero point per position and KV
    head (asymmetric, over head_dim), the layout of ExecuTorch's quantized KV cache, which its
    ``llama::custom_quantized_sdpa`` reads without dequantizing the cache. Each new key and
    value row is quantized as it is written (``quantized_decomposed`` per-token ops); the
    eager model runs the same ops, so the artifact's reference quantizes the cache exactly as
    the artifact does. About 3.7x smaller than float32 at head_dim 64 (64 + 5 bytes a row
    against 256), 3.85x at 128."""

    def __init__(self, max_seq_len: int, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        load_quantized_ops()
        shape, row = (1, max_seq_len, n_kv_heads, head_dim), (1, max_seq_len, n_kv_heads, 1)
        for kind in ("k", "v"):
            self.register_buffer(f"{kind}_cache", torch.zeros(shape, dtype=torch.int8), persistent=False)
            self.register_buffer(f"{kind}_scales", torch.ones(row), persistent=False)
            self.register_buffer(f"{kind}_zero_points", torch.zeros(row, dtype=torch.int8), persistent=False)

    def reset_buffers(self) -> None:
        for kind in ("k", "v"):
            getattr(self, f"{kind}_cache").zero_()
            getattr(self, f"{kind}_scales").fill_(1.0)
            getattr(self, f"{kind}_zero_points").zero_()

    def update(self, start_pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize k, v ([1, seq, n_kv, head_dim]) into rows start_pos..; the code caches."""
        for kind, value in (("k", k), ("v", v)):
            codes, scales, zero_points = quantize_rows(value)
            torch.ops.llama.update_cache(codes, getattr(self, f"{kind}_cache"), start_pos)
            torch.ops.llama.update_cache(scales, getattr(self, f"{kind}_scales"), start_pos)
            torch.ops.llama.update_cache(zero_points, getattr(self, f"{kind}_zero_points"), start_pos)
        return self.k_cache, self.v_cache


def load_quantized_ops() -> None:
    """Register the quantized_decomposed ops (per-token quantization), their out variants
    (ExecuTorch's quantized kernels: emitting a program needs them) and the llama:: ops."""
    from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401 - registers the ops

    from exporter.errors import require

    require("executorch.kernels.quantized", "executorch")
    load_custom_ops()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int8 over the last dimension: (codes, float32 scales, int8 zero points)."""
    scales, zero_points = torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    codes = torch.ops.quantized_decomposed.quantize_per_token(x, scales, zero_points, -128, 127, torch.int8)
    return codes, scales.to(torch.float32), zero_points.to(torch.int8)


@contextlib.contextmanager
def differentiable_attention(lm: nn.Module):
    """Inside the block, ``lm``'s attention and cache writes are the portable aten ops (masked
    SDPA, ``index_copy_``), which autograd differentiates: ExecuTorch's ``llama::`` ops have no
    backward, so gradients would not reach q, k and v through them. The same math, up to
    summation order; afterwards each module runs what it ran before."""
    from exporter.errors import UnsupportedError

    saved = []
    for module in lm.modules():
        if isinstance(module, Int8KVCache):
            raise UnsupportedError("end-to-end tuning through an int8 KV cache: its attention has no gradient",
                                   hint='tune with kv_cache.dtype = "float32", or remove [quant.tuning]')
        if isinstance(module, CachedAttention) and module.attention != "sdpa":
            saved.append((module, "attention", module.attention))
            module.attention = "sdpa"
            module.register_buffer("mask", torch.empty(module.max_seq_len, module.max_seq_len), persistent=False)
            module.reset_buffers()
        elif isinstance(module, StaticKVCache) and module.cache_update != "index_copy":
            saved.append((module, "cache_update", module.cache_update))
            module.cache_update = "index_copy"
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
            if name == "attention":
                del module._buffers["mask"]


class CachedAttention(nn.Module):
    """Causal attention of q ([1, seq, n_heads, head_dim]) over the cache, output [1, seq, n_heads*head_dim]."""

    def __init__(self, max_seq_len: int, n_heads: int, n_kv_heads: int, head_dim: int, *, attention: str) -> None:
        super().__init__()
        self.attention = attention
        self.max_seq_len = max_seq_len
        self.scale = head_dim**-0.5
        if attention == "sdpa":
            self.register_buffer("mask", torch.empty(max_seq_len, max_seq_len), persistent=False)
            self.reset_buffers()

    def reset_buffers(self) -> None:
        if self.attention == "sdpa":
            # Row i of the mask is what position i may see: 0 up to i, -inf after.
            n = self.mask.shape[0]
            self.mask.copy_(torch.full((n, n), float("-inf"), device=self.mask.device).triu(1))

    def forward(self, q, k_cache, v_cache, start_pos, quantized: Int8KVCache | None = None) -> torch.Tensor:
        """``quantized``: the cache is int8 (k_cache / v_cache its codes); the query is quantized
        per token and head as ExecuTorch's quantized SDPA takes it."""
        bsz, seq_len, n_heads, head_dim = q.shape
        if quantized is not None:
            codes, scales, zero_points = quantize_rows(q)
            out = torch.ops.llama.custom_quantized_sdpa(
                codes, k_cache, v_cache, start_pos, None, 0.0, True, self.scale, zero_points, scales,
                quantized.k_zero_points, quantized.k_scales, quantized.v_zero_points, quantized.v_scales)
        elif self.attention == "custom_sdpa":
            out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start_pos, None, 0.0, True, self.scale)
        else:
            mask = self.mask.narrow(0, start_pos, seq_len)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                attn_mask=mask, scale=self.scale, enable_gqa=True,
            ).transpose(1, 2)
        return out.reshape(bsz, seq_len, n_heads * head_dim)
