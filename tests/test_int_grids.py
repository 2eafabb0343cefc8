"""The round-to-nearest scale rules (exporter/int_grids.py) that the quantizers and the scale
search share: each block's extreme lands exactly on a level, and 0 is always representable."""

from __future__ import annotations

import torch

from exporter.quant.grids import asymmetric_range, block_extreme, exact_zero_point, symmetric_scales


def _blocks():
    blocks = torch.randn(64, 8, 32, generator=torch.Generator().manual_seed(0))
    blocks[0, 0] = 0.0  # an all-zero block
    blocks[1, 0] = blocks[1, 0].abs()  # all positive: the range must still reach 0
    return blocks


def test_symmetric_extreme_on_minus_middle_when_negative_scales_allowed():
    blocks = _blocks()
    scales = symmetric_scales(blocks, 4, positive=False)
    extreme = block_extreme(blocks)
    nonzero = scales != 0
    assert torch.equal((extreme[nonzero] / scales[nonzero]), torch.full_like(extreme[nonzero], -8.0))
    assert (blocks.abs().amax(-1) == extreme.abs()).all()


def test_symmetric_positive_scales_put_the_extreme_on_minus_8_or_plus_7():
    blocks = _blocks()
    scales = symmetric_scales(blocks, 4, positive=True)
    assert (scales > 0).all()  # an all-zero block gets 1, not 0
    assert scales[0, 0] == 1.0
    level = block_extreme(blocks) / scales
    # x / (x / 7) is 7 up to one rounding; x / (x / -8) exactly -8 (a power of two).
    assert torch.allclose(level[1:], torch.where(level[1:] < 0, -8.0, 7.0), rtol=0, atol=1e-5)


def test_asymmetric_range_spans_the_block_and_zero():
    blocks = _blocks()
    scales, low = asymmetric_range(blocks, 4)
    assert (low <= 0).all() and (low <= blocks.amin(-1)).all()
    assert torch.allclose(low + 15 * scales, torch.maximum(blocks.amax(-1), torch.zeros(())), atol=1e-6)
    zero = exact_zero_point(low, scales)
    assert zero[1, 0] == 0 and ((zero >= 0) & (zero <= 15)).all()
