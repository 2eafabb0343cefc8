"""Round-to-nearest integer grids: the scale rules every quantizer here starts from.

One function per rule, shared by the quantizers that store it (backends/onnx/blocks.py for
ONNX Runtime, backends/executorch/quantizer.int4_group_levels for XNNPACK) and by the scale
search, whose candidates start from the rule the target would otherwise store ("never worse
than round-to-nearest" compares against that rule only while both read it from here). Works
on torch tensors of blocks [..., block] in any float dtype; returns per-block values [...].
"""

from __future__ import annotations

import torch


def block_extreme(blocks: torch.Tensor) -> torch.Tensor:
    """Each block's value of largest magnitude, with its sign (the first one on a tie)."""
    return torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))[..., 0]


def symmetric_scales(blocks: torch.Tensor, bits: int, *, positive: bool) -> torch.Tensor:
    """Symmetric scales that put each block's extreme exactly on a level.

    ``positive=False``: the extreme on -2^(bits-1) (llama.cpp's Q4_0 rule; ONNX Runtime takes
    negative scales), one level of resolution more than absmax / (2^(bits-1) - 1), nothing
    clipped. ``positive=True`` (XNNPACK refuses negative scales): a negative extreme on
    -2^(bits-1), a positive one on 2^(bits-1) - 1, and an all-zero block gets scale 1."""
    middle = 1 << (bits - 1)
    extreme = block_extreme(blocks)
    if not positive:
        return extreme / -middle
    scales = torch.where(extreme < 0, extreme / -middle, extreme / (middle - 1))
    return torch.where(scales == 0, torch.ones_like(scales), scales)


def asymmetric_range(blocks: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale over each block's range widened to include 0, and that range's low end."""
    low = blocks.amin(-1).clamp(max=0)
    high = blocks.amax(-1).clamp(min=0)
    return (high - low) / ((1 << bits) - 1), low


def exact_zero_point(low: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The (fractional) zero point that puts ``low`` exactly on code 0; round-to-nearest rounds
    it, the scale search tries the integers either side."""
    return -low / torch.where(scales == 0, torch.ones_like(scales), scales)


def absmax_scales(blocks: torch.Tensor, qmax: int) -> torch.Tensor:
    """Symmetric scales on [-qmax, qmax] with each block's largest magnitude on +-qmax (Core ML's
    ``constexpr_blockwise_shift_scale`` grid, no zero point; the caller rounds them to what it stores)."""
    return blocks.abs().amax(dim=-1) / qmax


def as_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` [..., K] as [..., ceil(K / block), block], the last block padded with zeros (a
    partial group: zeros change no block's extreme and add nothing to a product)."""
    k = x.shape[-1]
    pad = -k % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], (k + pad) // block, block)
