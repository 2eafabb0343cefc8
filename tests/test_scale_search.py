"""Activation-aware block scales (exporter/scale_search.py): what they minimise, where they apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.backends.onnx.blocks import dequantize, quantize_blockwise
from exporter.recipe_io import recipe_from_dict


def gram_cost(weight: np.ndarray, stored, gram: torch.Tensor) -> np.ndarray:
    """e^T G e per (row, block), G damped as the search damps it: the cost it minimises."""
    from exporter.quant.block_search import DAMPING

    gram = gram.clone()
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1)
    diagonal += DAMPING * diagonal.mean(-1, keepdim=True)
    n, k = weight.shape
    block = stored.block_size
    e = torch.from_numpy((weight - dequantize(stored)).reshape(n, k // block, block)).double()
    return torch.einsum("nbi,bij,nbj->nb", e, gram, e).numpy()


def inputs_and_gram(k: int, block: int, seed: int = 0):
    """Activations like a decoder's: a shared positive offset per channel plus noise, so
    errors that all round one way add up (what min/max scales ignore)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(512, k)) + rng.uniform(0.5, 2.0, size=k)
    blocks = torch.from_numpy(x.reshape(512, k // block, block))
    return torch.einsum("tbi,tbj->bij", blocks, blocks)


@pytest.mark.parametrize("symmetric", [True, False])
def test_searched_scales_lower_the_output_error_block_by_block(symmetric):
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(48, 128)).astype(np.float32)
    gram = inputs_and_gram(128, 32)
    nearest = quantize_blockwise(weight, bits=4, block_size=32, symmetric=symmetric)
    searched = quantize_blockwise(weight, bits=4, block_size=32, symmetric=symmetric, gram=gram)
    before, after = gram_cost(weight, nearest, gram), gram_cost(weight, searched, gram)
    # Round-to-nearest's own scale is among the candidates, so no block may get worse
    # (float32 storage of the scale aside); and on these inputs the total falls well below.
    assert (after <= before * (1 + 1e-5) + 1e-9).all()
    assert after.sum() < 0.8 * before.sum()
    # Same storage as round-to-nearest: only the scale (and zero point) values differ.
    assert searched.packed.shape == nearest.packed.shape and searched.scales.dtype == np.float32
    assert (searched.zero_points is None) is symmetric


def test_recipe_table_is_checked():
    from exporter.errors import RecipeError

    recipe = recipe_from_dict({"name": "x", "quant": {"scale_search": {"method": "activation"}}})
    assert recipe.quant.scale_search.method == "activation" and recipe.quant.scale_search.calibration == "builtin"
    with pytest.raises(RecipeError, match=r"quant.scale_search.method: 'gptq' is not one of none, activation"):
        recipe_from_dict({"name": "x", "quant": {"scale_search": {"method": "gptq"}}})


def test_targets_with_their_own_quantizer_refuse_it():
    from exporter.backends.base import check_recipe
    from exporter.errors import UnsupportedError

    recipe = recipe_from_dict({"name": "x", "quant": {"scale_search": {"method": "activation"}},
                               "target": {"name": "coreml"}})
    with pytest.raises(UnsupportedError, match=r"quant\.scale_search: searching block scales is not supported by the "
                                               r"coreml target \(supported by: executorch, onnx\)"):
        check_recipe(recipe)


def test_executorch_group_levels_search_positive_bfloat16_scales():
    """XNNPACK stores positive bfloat16 group scales; the search compares what it will hold."""
    from exporter.backends.executorch.quantizer import int4_group_levels

    rng = np.random.default_rng(2)
    weight = torch.from_numpy(rng.normal(size=(48, 128)).astype(np.float32))
    gram = inputs_and_gram(128, 32)
    costs = []
    for g in (None, gram):
        codes, scales = int4_group_levels(weight, 32, linear=True, gram=g)
        assert (scales > 0).all() and torch.equal(scales, scales.to(torch.bfloat16).float())
        assert codes.min() >= -8 and codes.max() <= 7
        e = ((weight - (codes.float().reshape(48, 4, 32) * scales[..., None]).reshape(48, 128))
             .double().reshape(48, 4, 32))
        costs.append(torch.einsum("nbi,bij,nbj->nb", e, gram, e).sum().item())
    assert costs[1] < 0.8 * costs[0]
