"""Static int8 KV-cache scales: one per layer, KV head and channel, calibrated on text.

onnxruntime's GroupQueryAttention stores an int8 cache with fixed scales given to it as
inputs (``k_scale`` / ``v_scale``, PER_CHANNEL: ``[kv_heads, 1, head_dim]``), symmetric,
codes ``clamp(round_half_even(x / scale), -128, 127)`` and attention over ``codes * scale``
(probed on onnxruntime 1.32, docs/targets/onnx.md). The scales are each channel's largest
magnitude over the calibration texts' keys (after rotary) and values, over 127: what the
float decoder writes into its cache, recorded before any is rounded. The eager decoder then
rounds what it writes the same way (``StaticKVCache.static_scales``), so the reference
computes what the artifact computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from exporter.kv_cache import StaticKVCache

# A channel that never moved on the calibration text still needs a non-zero step.
SMALLEST_SCALE = 1e-8


def kv_caches(lm) -> list[StaticKVCache]:
    return [layer.self_attn.kv_cache for layer in lm.model.layers]


def calibrate_kv_scales(lm, samples: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (key scales, value scales) of shape [kv_heads, head_dim]: absmax / 127 of
    what each cache was given over one prefill of every sample."""
    caches = kv_caches(lm)
    peaks: list[list[torch.Tensor | None]] = [[None, None] for _ in caches]

    def observer(index: int):
        def observe(k: torch.Tensor, v: torch.Tensor) -> None:
            for j, value in enumerate((k, v)):
                peak = value.detach().abs().amax(dim=(0, 1))  # [kv_heads, head_dim]
                peaks[index][j] = peak if peaks[index][j] is None else torch.maximum(peaks[index][j], peak)
        return observe

    try:
        for i, cache in enumerate(caches):
            cache.observer = observer(i)
        with torch.no_grad():
            for sample in samples:
                lm.reset_caches()
                lm(torch.tensor([list(sample)], dtype=torch.long), torch.tensor([0], dtype=torch.long))
    finally:
        for cache in caches:
            cache.observer = None
        lm.reset_caches()
    return [((k / 127).clamp_min(SMALLEST_SCALE), (v / 127).clamp_min(SMALLEST_SCALE)) for k, v in peaks]


def set_kv_scales(lm, scales: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Every layer's cache rounds what it writes to its int8 grid from here on."""
    for cache, (k_scale, v_scale) in zip(kv_caches(lm), scales, strict=True):
        cache.static_scales = (k_scale.float(), v_scale.float())


def kv_scales_of(lm) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each layer's (key, value) scales [kv_heads, head_dim] when the decoder's cache has
    them (an int8 cache with fixed scales), else None."""
    scales = [cache.static_scales for cache in kv_caches(lm)]
    return scales if all(pair is not None for pair in scales) else None
