"""Core ML weight compression, computed here rather than by coremltools' optimizer.

Why our own: the eager reference must compute with exactly the weights the package stores.
coremltools' ``linear_quantize_weights`` decides by itself which consts to compress (it
skips weights below a size threshold and, at int4 per block, weights whose input size the
block does not divide, without saying so). Here every module the recipe's rules match gets
its codes and scales computed once, in torch; the eager model is given the dequantized
values, and ``lower`` writes these very codes into the program (``constexpr_*`` ops). A
module that should be compressed but is not found in the program is an error, never a
silent fp16 fallback.

Storage (Core ML iOS 18 ops):
- float:          fp16 weights (the package computes in fp16).
- int8_weight:    int8 codes, one fp16 scale per output channel (symmetric, [-127, 127]),
                  ``constexpr_blockwise_shift_scale``.
- int4_weight:    int4 codes, one fp16 scale per block of ``group_size`` inputs of an output
                  channel (symmetric, [-7, 7]), ``constexpr_blockwise_shift_scale``.
- palettize_4bit: uint4 indices into a 16-entry fp16 lookup table per group of ``group_size``
                  output channels (k-means), ``constexpr_lut_to_dense``.
Dequantized value = fp16(scale * code) or lut[index]: what Core ML materialises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from exporter.errors import RecipeError
from exporter.quant.grids import absmax_scales
from exporter.quant.plan import QuantSummary, plan


@dataclass
class Compressed:
    """What the package stores for one weight ([out, in] for linear, [vocab, dim] for embedding)."""

    scheme: str
    data: np.ndarray  # int8 codes (int8 / int4 range) or uint8 palette indices (0..15)
    scale: np.ndarray | None = None  # float16, [out, in / block]
    lut: np.ndarray | None = None  # float16, [out / group, 1, 16, 1]

    def dequantize(self) -> np.ndarray:
        """float32 array holding exactly the fp16 values Core ML materialises."""
        if self.scheme == "palettize_4bit":
            groups = self.lut.shape[0]
            table = self.lut.reshape(groups, 16).astype(np.float32)
            idx = self.data.reshape(groups, -1).astype(np.int64)
            return np.take_along_axis(table, idx, axis=1).reshape(self.data.shape)
        block = self.data.shape[1] // self.scale.shape[1]
        scale = np.repeat(self.scale.astype(np.float32), block, axis=1)
        return (self.data.astype(np.float32) * scale).astype(np.float16).astype(np.float32)


def fp16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(t.dtype)


def symmetric_blocks(weight: torch.Tensor, block: int, qmax: int) -> Compressed:
    """Symmetric integer codes with an fp16 scale per block of ``block`` inputs (per channel when block = in)."""
    out_f, in_f = weight.shape
    w = weight.detach().to(torch.float32).reshape(out_f, in_f // block, block)
    scale = absmax_scales(w, qmax).to(torch.float16)
    # An all-zero block: any scale works; 1 keeps the codes 0 and avoids a division by zero.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round(w / scale.to(torch.float32)[..., None]), -qmax, qmax).to(torch.int8)
    return Compressed(scheme="int8_weight" if qmax == 127 else "int4_weight",
                      data=codes.reshape(out_f, in_f).numpy(), scale=scale.numpy())


def palettize(weight: torch.Tensor, group: int, iterations: int = 12) -> Compressed:
    """4-bit palettization: k-means with 16 centroids per group of ``group`` output channels.

    One-dimensional k-means, batched over groups: centroids start at quantiles, points are
    assigned by searchsorted over the midpoints of the sorted centroids, centroids move to
    the mean of their points (an empty cluster keeps its centroid). Deterministic."""
    out_f, in_f = weight.shape
    x = weight.detach().to(torch.float32).reshape(out_f // group, group * in_f)
    q = torch.linspace(0.5 / 16, 1 - 0.5 / 16, 16)
    cent = torch.quantile(x[:, :: max(1, x.shape[1] // 4096)], q, dim=1).T.contiguous()  # [G, 16]
    for _ in range(iterations):
        cent, _ = torch.sort(cent, dim=1)
        idx = torch.searchsorted((cent[:, 1:] + cent[:, :-1]) / 2, x.contiguous())
        sums = torch.zeros_like(cent).scatter_add_(1, idx, x)
        counts = torch.zeros_like(cent).scatter_add_(1, idx, torch.ones_like(x))
        cent = torch.where(counts > 0, sums / counts.clamp(min=1), cent)
    # The stored table is fp16: assign every weight to its nearest fp16 entry.
    lut32, _ = torch.sort(cent.to(torch.float16).to(torch.float32), dim=1)
    idx = torch.searchsorted((lut32[:, 1:] + lut32[:, :-1]) / 2, x.contiguous())
    return Compressed(scheme="palettize_4bit", data=idx.to(torch.uint8).reshape(out_f, in_f).numpy(),
                      lut=lut32.to(torch.float16).numpy().reshape(out_f // group, 1, 16, 1))


def _int8_channels(weight: torch.Tensor, name: str, group_size: int) -> Compressed:
    return symmetric_blocks(weight, weight.shape[1], 127)


def _int4_blocks(weight: torch.Tensor, name: str, group_size: int) -> Compressed:
    if weight.shape[1] % group_size:  # plan() gives such a layer one block per row first; kept as a guard
        raise RecipeError(f"int4 block {group_size} does not divide the input size {weight.shape[1]} of {name}")
    return symmetric_blocks(weight, group_size, 7)


def _palette(weight: torch.Tensor, name: str, group_size: int) -> Compressed:
    if weight.shape[0] % group_size:
        raise RecipeError(f"palettize_4bit: group_size {group_size} does not divide the {weight.shape[0]} output "
                          f"channels of {name}; choose a group size that divides it or keep that module float")
    return palettize(weight, group_size)


# The handler of each scheme the package stores compressed (the backend's storage table
# declares the same schemes; "float" is fp16, no handler).
COMPRESSORS = {"int8_weight": _int8_channels, "int4_weight": _int4_blocks, "palettize_4bit": _palette}


def compress_module(module: nn.Module, name: str, scheme: str, group_size: int) -> Compressed:
    return COMPRESSORS[scheme](module.weight, name, group_size)


def quantize_for_coreml(lm: nn.Module, spec) -> tuple[QuantSummary, dict[nn.Module, Compressed]]:
    """Round the decoder to what the package stores, in place; return the rule summary and
    each compressed module's stored form (which ``lower`` writes).

    Every parameter and the RoPE tables become fp16 values (the package holds fp16 consts
    and computes in fp16); matched modules get their compressed weights dequantized."""
    summary = plan(lm, spec)
    compressed: dict[nn.Module, Compressed] = {}
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(fp16_round(p))
        for name in ("rope_cos", "rope_sin"):
            buf = getattr(lm, name, None)
            if buf is not None:
                buf.copy_(fp16_round(buf))
        modules = dict(lm.named_modules())
        for match in summary.rules:
            if match.rule.scheme == "float":
                continue
            for name in match.modules:
                module = modules[name]
                comp = compress_module(module, name, match.rule.scheme, match.group_size_of(name))
                module.weight.copy_(torch.from_numpy(comp.dequantize()))
                compressed[module] = comp
    return summary, compressed
