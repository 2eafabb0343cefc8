"""Block-wise integer weights in ONNX Runtime's storage layout (MatMulNBits, GatherBlockQuantized).

A weight ``W`` of shape [N, K] (a Linear's out x in, or an embedding's vocab x dim) is cut
along K into blocks of ``block_size``; each (row, block) has a float32 scale and, when
asymmetric, an unsigned zero point. Values are stored unsigned: ``q = round(w / scale) + zp``
with ``zp`` fixed at the middle of the range when symmetric (8 for 4 bits, 128 for 8 bits,
the defaults ONNX Runtime assumes when no zero point is given). 4-bit values are packed two
per byte, the even element in the low nibble.

``dequantize`` gives back exactly the float weight the runtime computes with; the eager
reference is built from it, so lowering parity compares the same math.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# MatMulNBits accuracy_level: 0 computes in the input's float type (exactly the dequantized
# weight's math); 4 quantizes activations to int8 per block (the dynamic-activation schemes).
ACCURACY_FLOAT, ACCURACY_INT8 = 0, 4


@dataclass(frozen=True, kw_only=True)
class BlockQuantized:
    bits: int
    block_size: int
    symmetric: bool
    shape: tuple[int, int]  # [N, K] of the float weight
    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)], None when symmetric

    @property
    def k_blocks(self) -> int:
        return self.packed.shape[1]

    def same_storage(self, other: BlockQuantized) -> bool:
        return (self.bits, self.block_size, self.symmetric, self.shape) == (
            other.bits, other.block_size, other.symmetric, other.shape
        ) and np.array_equal(self.packed, other.packed) and np.array_equal(self.scales, other.scales)


@dataclass(frozen=True, kw_only=True)
class StoredWeight:
    """How the ONNX graph stores one quantized module: its blocks and MatMulNBits' accuracy."""

    blocks: BlockQuantized
    accuracy: int = ACCURACY_FLOAT


def quantize_blockwise(weight: np.ndarray, *, bits: int, block_size: int, symmetric: bool,
                       gram=None) -> BlockQuantized:
    """Round-to-nearest block quantization of a float [N, K] weight (K padded to whole blocks).

    ``gram``: the block-diagonal input Gram matrix of the layer, [k_blocks, block, block]
    (block_search.input_grams); given, each block's scale and zero point are searched to
    minimise the output error (block_search.search_block_scales) instead of taken from the
    block's min/max."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((n, k_blocks * block_size), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, k_blocks, block_size)
    qmax = (1 << bits) - 1
    if gram is not None:
        from exporter.quant.block_search import search_block_scales

        scales, zero = search_block_scales(blocks, gram, bits=bits, symmetric=symmetric)
    else:
        import torch

        from exporter.quant.grids import asymmetric_range, exact_zero_point, symmetric_scales

        as_blocks = torch.from_numpy(blocks)
        if symmetric:
            scales = symmetric_scales(as_blocks, bits, positive=False).numpy()
            zero = np.full(scales.shape, 1 << (bits - 1), dtype=np.float32)  # 8 or 128
        else:
            scales_t, low = asymmetric_range(as_blocks, bits)
            scales = scales_t.numpy()
            zero = np.clip(np.round(exact_zero_point(low, scales_t).numpy()), 0, qmax)
    safe = np.where(scales == 0, 1, scales)[..., None]
    q = np.clip(np.round(blocks / safe) + zero[..., None], 0, qmax).astype(np.uint8)
    return BlockQuantized(
        bits=bits, block_size=block_size, symmetric=symmetric, shape=(n, k),
        packed=_pack(q, bits), scales=scales,
        zero_points=None if symmetric else _pack(zero.astype(np.uint8), bits),
    )


def dequantize(bq: BlockQuantized) -> np.ndarray:
    """The float32 [N, K] weight the runtime computes with."""
    n, k = bq.shape
    w = centred_codes(bq).astype(np.float32) * bq.scales[..., None]
    return w.reshape(n, -1)[:, :k]


def centred_codes(bq: BlockQuantized) -> np.ndarray:
    """Stored values minus their zero point, int16 [N, k_blocks, block_size] (8-bit codes
    less their zero point span -255..255): what each block's scale multiplies."""
    q = _unpack(bq.packed, bq.bits, bq.block_size).astype(np.int16)
    if bq.zero_points is None:
        zero = np.full(bq.scales.shape, 1 << (bq.bits - 1), dtype=np.int16)
    else:
        zero = _unpack(bq.zero_points, bq.bits, bq.k_blocks).astype(np.int16)
    return q - zero[..., None]


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values along the last axis, packed two per byte for 4 bits (low nibble first)."""
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :count]
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :count]


def fake_quantize_activation(x, block_size: int):
    """What MatMulNBits with accuracy_level 4 does to its input, in torch: per block of
    ``block_size`` along the last axis, symmetric int8 with scale amax / 127, rounded to
    nearest even after multiplying by the inverse scale (as ONNX Runtime's MLAS kernels do).
    The kernel then multiplies integers; the float product of the dequantized values equals
    it up to summation order (docs/targets/onnx.md)."""
    import torch

    from exporter.quant.grids import as_blocks

    shape = x.shape
    blocks = as_blocks(x, block_size)  # a partial last block: the kernel's is padded with zeros too
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    inverse = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0)
    q = torch.round(blocks * inverse)  # torch.round: half to even, like the kernel's nearest-even
    quantized = (q * scale).reshape(*shape[:-1], -1)[..., :shape[-1]]
    if x.requires_grad and torch.is_grad_enabled():
        # Training through it (quant/tuning.py): the rounding's gradient taken as 1. Only
        # then: x + (q - x) need not equal q to the last bit.
        return x + (quantized - x).detach()
    return quantized
