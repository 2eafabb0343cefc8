"""End-to-end tuning (exporter/tuning.py): the recipe table, where it applies, what it trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.recipe_io import recipe_from_dict


def test_recipe_table_is_checked():
    from exporter.errors import RecipeError

    tuning = recipe_from_dict({"name": "x", "quant": {"tuning": {"steps": 4}}}).quant.tuning
    assert (tuning.steps, tuning.scales, tuning.norms, tuning.calibration) == (4, True, True, "builtin")
    assert recipe_from_dict({"name": "x"}).quant.tuning.steps == 0  # off unless asked for
    for table, message in (({"steps": -1}, "quant.tuning.steps: must be 0"),
                           ({"steps": 2, "learning_rate": 0.0}, "quant.tuning.learning_rate: must be above 0"),
                           ({"steps": 2, "scales": False, "norms": False},
                            "quant.tuning: scales and norms are both false")):
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict({"name": "x", "quant": {"tuning": table}})


@pytest.mark.parametrize("target", ["executorch", "coreml"])
def test_targets_with_their_own_quantizer_refuse_it(target):
    from exporter.backends.base import check_recipe
    from exporter.errors import UnsupportedError

    recipe = recipe_from_dict({"name": "x", "quant": {"tuning": {"steps": 2}}, "target": {"name": target}})
    with pytest.raises(UnsupportedError, match=rf"quant\.tuning: end-to-end tuning of stored scales is not supported "
                                               rf"by the {target} target \(supported by: onnx\); remove "
                                               rf"\[quant\.tuning\]"):
        check_recipe(recipe)


def test_block_scales_start_at_the_stored_weight_and_store_what_they_train():
    """Step 0 is the quantized weight as stored (factor 1); a trained factor goes into the
    scales only, with the same codes and zero points."""
    from exporter.backends.onnx.blocks import StoredWeight, dequantize, quantize_blockwise
    from exporter.backends.onnx.tuning import BlockScales
    from exporter.quant.plan import Quantized, QuantSummary

    weight = np.random.default_rng(0).normal(size=(24, 64)).astype(np.float32)
    stored = quantize_blockwise(weight, bits=4, block_size=32, symmetric=False)
    module = torch.nn.Linear(64, 24, bias=False)
    quantized = Quantized(summary=QuantSummary(rules=[], unmatched=[]), stored={module: StoredWeight(blocks=stored)})
    blocks = BlockScales(stored, [module], quantized)
    np.testing.assert_array_equal(blocks.weight().detach().numpy(), dequantize(stored))
    with torch.no_grad():
        blocks.log_factor.fill_(np.log(1.5))
    finished = blocks.finish()
    tuned = quantized.stored[module].blocks  # finish() wrote the trained scales into the store
    np.testing.assert_array_equal(tuned.packed, stored.packed)
    np.testing.assert_array_equal(tuned.zero_points, stored.zero_points)
    np.testing.assert_allclose(tuned.scales, stored.scales * 1.5, rtol=1e-6)
    np.testing.assert_allclose(dequantize(tuned), blocks.weight().detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(finished.numpy(), dequantize(tuned))


def test_tuning_twice_gives_the_same_bytes(tiny_checkpoints):
    """Reproducible artifacts: the same recipe tunes to the same scales and norm weights."""
    from conftest import quant_rules

    from exporter.backends import get_backend
    from exporter.decoder import RMSNorm
    from exporter.load import load_model
    from exporter.quant.apply import build_quantized

    raw = {"name": "x", "model": {"source": str(tiny_checkpoints["llama"])},
           "quant": {"tuning": {"steps": 3}}, "target": {"name": "onnx"}}
    import tomllib

    raw["quant"].update(tomllib.loads(quant_rules("int8_dynact_int4_weight", embedding="int4_weight"))["quant"])
    recipe = recipe_from_dict(raw)
    loaded = load_model(str(tiny_checkpoints["llama"]))
    runs = []
    for _ in range(2):
        lm, quantized = build_quantized(loaded, recipe, get_backend("onnx"))
        tuning = quantized.summary.tuning
        assert tuning["calibration_kl_after"] < tuning["calibration_kl_before"]
        runs.append([quantized.stored[m].blocks.scales for m in lm.modules() if m in quantized.stored]
                    + [m.weight.detach().numpy() for m in lm.modules() if isinstance(m, RMSNorm)])
    assert len(runs[0]) == len(runs[1]) > len([m for m in lm.modules() if isinstance(m, RMSNorm)])
    assert all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))


def test_activation_rounding_passes_gradients_straight_through_only_when_training():
    """int8 activations (accuracy_level 4) round; tuning differentiates through them as if
    they did not, and outside training the values are the kernel's exactly."""
    from exporter.backends.onnx.blocks import fake_quantize_activation

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    exact = fake_quantize_activation(x, 32)
    trained = x.clone().requires_grad_(True)
    out = fake_quantize_activation(trained, 32)
    out.sum().backward()
    torch.testing.assert_close(trained.grad, torch.ones_like(x))
    torch.testing.assert_close(out.detach(), exact, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(fake_quantize_activation(trained, 32), exact)
