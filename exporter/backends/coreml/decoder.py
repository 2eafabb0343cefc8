"""The torch module that coremltools converts: our decoder's weights, Core ML's way of caching.

Why a second forward over the same modules: StaticCacheLM.forward reads its position with
``.item()`` and slices with it, which torch.jit.trace would freeze into a constant. Here the
position stays a tensor (``input_pos``), so the trace records a dynamic ``slice_update`` of
the cache and a position-derived mask, and coremltools turns the fp16 cache buffers into
Core ML states (``read_state`` / ``coreml_update_state``). Everything else is the decoder's
own modules (weights, RMSNorm, MLP), so the math is the eager reference's.

Program contract (the .mlpackage's ``main``):
  tokens int32 [1, seq] (1 <= seq <= max_prefill_len), input_pos int32 [1] (position of
  tokens[0]) -> logits float32 [1, vocab] of the last token; states k_cache_<i>, v_cache_<i>
  fp16 [n_kv_heads, max_seq_len, head_dim], one pair per layer.
RMSNorm is rewritten to be safe in fp16 (see ``rms_norm``): a residual stream that reaches
|x| > 256 (SmolLM2's does) has squares that overflow fp16, which turned a whole position's
logits to 0.
Attention is F.scaled_dot_product_attention without an explicit scale and with a boolean
mask, which coremltools lowers to Core ML's fused ``scaled_dot_product_attention`` (iOS 18).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def state_names(n_layers: int) -> list[str]:
    return [f"{kind}_cache_{i}" for i in range(n_layers) for kind in ("k", "v")]


class CoreMLDecoder(nn.Module):
    def __init__(self, lm) -> None:
        super().__init__()
        self.lm = lm
        s = lm.shape
        self.n_heads, self.n_kv_heads, self.head_dim = s.n_heads, s.n_kv_heads, s.head_dim
        shape = (s.n_kv_heads, lm.max_seq_len, s.head_dim)
        for name in state_names(s.n_layers):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("key_positions", torch.arange(lm.max_seq_len, dtype=torch.int32))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        lm = self.lm
        seq = tokens.shape[1]
        pos = input_pos[0]
        positions = torch.arange(seq, dtype=torch.int32) + input_pos  # [seq]
        cos = lm.rope_cos[positions]  # [seq, 1, head_dim]
        sin = lm.rope_sin[positions]
        allowed = self.key_positions[None, :] <= positions[:, None]  # [seq, max_seq_len], causal
        x = lm.model.embed_tokens(tokens)
        for i, layer in enumerate(lm.model.layers):
            x = x + self._attention(i, layer.self_attn, rms_norm(layer.input_layernorm, x), pos, seq, cos, sin,
                                    allowed)
            x = x + layer.mlp(rms_norm(layer.post_attention_layernorm, x))
        return lm.lm_head(rms_norm(lm.model.norm, x[:, -1, :]))

    def _attention(self, i, attn, x, pos, seq, cos, sin, allowed):
        from exporter.decoder import rotate_half

        q = attn.q_proj(x).view(1, seq, self.n_heads, self.head_dim)
        k = attn.k_proj(x).view(1, seq, self.n_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(1, seq, self.n_kv_heads, self.head_dim)
        if attn.qk_norm:
            q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
        # In-place writes into the state at rows pos..pos+seq (a Core ML slice_update).
        k_cache[:, pos : pos + seq, :] = k[0].transpose(0, 1).to(torch.float16)
        v_cache[:, pos : pos + seq, :] = v[0].transpose(0, 1).to(torch.float16)
        group = self.n_heads // self.n_kv_heads
        keys = _repeat_heads(k_cache.to(q.dtype), group)
        values = _repeat_heads(v_cache.to(q.dtype), group)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=allowed)
        return attn.o_proj(out.transpose(1, 2).reshape(1, seq, self.n_heads * self.head_dim))


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """``norm.weight * x / sqrt(mean(x^2) + eps)``, computed without squaring large values.

    In fp16, x^2 overflows for |x| > 256. Dividing by s = max|x| first keeps every square
    in [0, 1]: x * rsqrt(mean(x^2) + eps) = (x/s) * rsqrt(mean((x/s)^2) + eps/s^2), the
    same value in exact arithmetic (float32 eager agrees to 1e-7). s is clamped to 1e-4 so
    an all-zero row stays finite (eps/s^2 then bounds the result as eps does)."""
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4)
    xs = x / s
    variance = xs.pow(2).mean(-1, keepdim=True)
    return norm.weight * (xs * torch.rsqrt(variance + norm.eps / (s * s)))


def _repeat_heads(cache: torch.Tensor, group: int) -> torch.Tensor:
    """[n_kv, S, d] -> [1, n_kv * group, S, d], each kv head repeated for its query heads."""
    n_kv, length, dim = cache.shape
    if group == 1:
        return cache[None]
    return cache[:, None].expand(n_kv, group, length, dim).reshape(1, n_kv * group, length, dim)
