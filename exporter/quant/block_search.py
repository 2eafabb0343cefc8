"""Activation-aware choice of block scales (and zero points) for round-to-nearest int4.

Round-to-nearest with min/max scales minimises nothing in particular. What the model feels
is a layer's output error: for a block of weights ``w`` (one output row, ``block_size``
inputs) quantized to ``w + e``, the output changes by ``e . x`` over the block's inputs
``x``, whose mean square over calibration inputs is ``e^T G e`` with ``G`` the block's input
Gram matrix (sum of ``x x^T``). That cost also sees the errors that add up rather than
cancel: a block of weights all rounded the same way (an integer zero point that cannot hold
a checkpoint's float offset) against inputs that share a sign.

``search_block_scales`` tries a grid of scales around the min/max one (and the two nearest
zero points when asymmetric), keeps the cheapest per block, then refits each block's scale
by least squares for its chosen integers and keeps that when cheaper. The values stay
round-to-nearest on the chosen grid, so storage and kernels are unchanged: only which scale
each block gets. What it gains is measured in docs/targets/onnx.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

# Scales tried, as multiples of the min/max scale. Below 1 clips the block's extremes for
# finer steps elsewhere; above 1 moves the grid by a fraction of a step (a finer grid gained
# nothing: docs/targets/onnx.md).
SCALE_FACTORS = np.round(np.linspace(0.80, 1.06, 14), 2)  # 0.80, 0.82, ..., 1.00 (min/max itself), ..., 1.06
# Added to every Gram diagonal, relative to its mean: a block whose inputs were never
# exercised by calibration still pays for error, and the least-squares refit stays defined.
DAMPING = 0.01
REFIT_ROUNDS = 3
ROWS_PER_CHUNK = 2048


def input_grams(lm: nn.Module, samples: Sequence[Sequence[int]],
                block_sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Block-diagonal input Gram matrices, [k_blocks, block, block] float64, of the Linears
    named in ``block_sizes`` (name -> block size), over one prefill of each sample."""
    from exporter.quant.calibration import observe_linear_inputs

    grams: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        from exporter.quant.grids import as_blocks

        blocks = as_blocks(x.reshape(-1, x.shape[-1]), block_sizes[name]).double()
        gram = torch.einsum("tbi,tbj->bij", blocks, blocks)
        grams[name] = grams[name] + gram if name in grams else gram

    observe_linear_inputs(lm, samples, list(block_sizes), add)
    return grams


def search_block_scales(blocks: np.ndarray, gram: torch.Tensor, *, bits: int, symmetric: bool,
                        positive_scales: bool = False, scale_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Scales [N, k_blocks] (float32) and zero points (float, integral) for ``blocks``
    [N, k_blocks, block] that minimise each block's ``e^T G e``. Symmetric zero points are
    the middle of the range, as ONNX Runtime assumes without stored zero points.

    ``positive_scales``: only scales > 0 (XNNPACK refuses negative ones). ``scale_dtype``:
    every candidate is rounded to it first (XNNPACK stores bfloat16), so the cost compared is
    that of the scale the target will hold."""
    g = gram.clone()
    diagonal = torch.diagonal(g, dim1=-2, dim2=-1)
    diagonal += DAMPING * diagonal.mean(-1, keepdim=True) + 1e-12
    # Rows in chunks: float64 temporaries of a whole large-vocabulary lm_head would double
    # an export's peak memory.
    found = [_search_rows(torch.from_numpy(blocks[i:i + ROWS_PER_CHUNK]).double(), g, bits, symmetric,
                          positive_scales, scale_dtype) for i in range(0, blocks.shape[0], ROWS_PER_CHUNK)]
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def _search_rows(w: torch.Tensor, g: torch.Tensor, bits: int, symmetric: bool, positive_scales: bool, scale_dtype):
    stored = (lambda s: s.to(scale_dtype).double()) if scale_dtype is not None else (lambda s: s)  # noqa: E731
    qmax = (1 << bits) - 1
    middle = 1 << (bits - 1)

    def cost(scale, zero):
        q = _codes(w, scale, zero, qmax)
        e = w - scale[..., None] * (q - zero[..., None])
        return torch.einsum("nbi,bij,nbj->nb", e, g, e)

    best_cost = torch.full(w.shape[:2], float("inf"), dtype=torch.float64)
    best_scale = torch.ones(w.shape[:2], dtype=torch.float64)
    best_zero = torch.full(w.shape[:2], float(middle), dtype=torch.float64)
    for base, zeros in _candidate_grids(w, bits, symmetric, positive_scales):
        for factor in SCALE_FACTORS:
            scale = stored(base * factor)
            for zero in zeros(scale):
                c = cost(scale, zero)
                better = c < best_cost
                best_cost = torch.where(better, c, best_cost)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero, best_zero)
    for _ in range(REFIT_ROUNDS):
        # Least-squares scale for the integers chosen: argmin_s (w - s c)^T G (w - s c).
        centred = _codes(w, best_scale, best_zero, qmax) - best_zero[..., None]
        gc = torch.einsum("nbi,bij->nbj", centred, g)
        denominator = (gc * centred).sum(-1)
        refit = torch.where(denominator > 0, (gc * w).sum(-1) / denominator.clamp(min=1e-300), best_scale)
        refit = stored(torch.where(refit > 0, refit, best_scale) if positive_scales else refit)
        c = cost(refit, best_zero)
        better = c < best_cost
        best_cost = torch.where(better, c, best_cost)
        best_scale = torch.where(better, refit, best_scale)
    return best_scale.float().numpy(), best_zero.numpy()


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(w / safe[..., None]) + zero[..., None], 0, qmax)


def _candidate_grids(w: torch.Tensor, bits: int, symmetric: bool, positive_scales: bool):
    """(base scale, zero points for a scale) pairs: round-to-nearest's own rules (int_grids),
    the same functions the quantizers store without a search."""
    from exporter.quant.grids import asymmetric_range, block_extreme, exact_zero_point, symmetric_scales

    qmax = (1 << bits) - 1
    middle = 1 << (bits - 1)
    if symmetric:
        fixed = lambda scale: (torch.full_like(scale, float(middle)),)  # noqa: E731
        if positive_scales:
            return [(symmetric_scales(w, bits, positive=True), fixed)]
        # The ONNX quantizer's rule (the extreme on -middle), and the extreme on +(middle - 1).
        return [(symmetric_scales(w, bits, positive=False), fixed), (block_extreme(w) / (middle - 1), fixed)]
    base, low = asymmetric_range(w, bits)

    def nearest_zeros(scale):
        exact = exact_zero_point(low, scale)
        return (torch.floor(exact).clamp(0, qmax), torch.ceil(exact).clamp(0, qmax))
    return [(base, nearest_zeros)]


def calibrate(lm: nn.Module, tokenizer, quant) -> tuple[dict[str, torch.Tensor], dict]:
    """Input Gram matrices of every Linear a rule quantizes (``quant``: the recipe's
    QuantSpec), over the scale search's calibration texts; and what goes in the manifest."""
    from exporter.quant.calibration import calibration_samples, calibration_texts
    from exporter.quant.plan import module_kind, plan

    modules = dict(lm.named_modules())
    block_sizes = {name: match.group_size_of(name) for match in plan(lm, quant).rules if match.rule.scheme != "float"
                   for name in match.modules if module_kind(modules[name]) == "linear"}
    texts = calibration_texts(quant.scale_search, "quant.scale_search.calibration")
    samples = calibration_samples(lm, tokenizer, texts)
    grams = input_grams(lm, samples, block_sizes)
    return grams, {
        "method": quant.scale_search.method,
        "calibration": quant.scale_search.calibration,
        "calibration_samples": len(texts),
        "calibration_tokens": sum(len(ids) for ids in samples),
        "searched_linears": len(grams),
    }
