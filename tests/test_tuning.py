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


def test_a_target_without_tunable_storage_refuses_it():
    from exporter.backends.base import check_recipe
    from exporter.errors import UnsupportedError

    recipe = recipe_from_dict({"name": "x", "quant": {"tuning": {"steps": 2}}, "target": {"name": "coreml"}})
    with pytest.raises(UnsupportedError, match=r"quant\.tuning: end-to-end tuning of stored scales is not supported "
                                               r"by the coreml target \(supported by: executorch, onnx\); remove "
                                               r"\[quant\.tuning\]"):
        check_recipe(recipe)


def test_block_scales_start_at_the_stored_weight_and_store_what_they_train():
    """Step 0 is the quantized weight as stored (factor 1); a trained factor goes into the
    scales only, with the same codes and zero points."""
    from exporter.backends.onnx.blocks import StoredWeight, dequantize, quantize_blockwise
    from exporter.backends.onnx.tuning import BlockScales
    from exporter.quant.plan import Quantized, QuantSummary
    from exporter.quant.tuning import dequantized

    weight = np.random.default_rng(0).normal(size=(24, 64)).astype(np.float32)
    stored = quantize_blockwise(weight, bits=4, block_size=32, symmetric=False)
    module = torch.nn.Linear(64, 24, bias=False)
    quantized = Quantized(summary=QuantSummary(rules=[], unmatched=[]), stored={module: StoredWeight(blocks=stored)})
    blocks = BlockScales(stored, [module], quantized)
    start = dequantized(blocks.centred, blocks.scales(), 64).detach().numpy()
    np.testing.assert_array_equal(start, dequantize(stored))
    with torch.no_grad():
        blocks.log_factor.fill_(np.log(1.5))
    blocks.finish()
    tuned = quantized.stored[module].blocks  # finish() wrote the trained scales into the store
    np.testing.assert_array_equal(tuned.packed, stored.packed)
    np.testing.assert_array_equal(tuned.zero_points, stored.zero_points)
    np.testing.assert_allclose(tuned.scales, stored.scales * 1.5, rtol=1e-6)
    np.testing.assert_allclose(dequantize(tuned), dequantized(blocks.centred, blocks.scales(), 64).detach().numpy(),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(module.weight.numpy(), dequantize(tuned))  # and the module computes with it


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


def test_executorch_tuning_reaches_every_stored_scale_and_restores_the_torchao_layout(tiny_checkpoints):
    """Gradients reach every quantized weight, q/k/v included (ExecuTorch's llama:: attention
    ops have no backward: tuning runs the same math in aten ops); afterwards each Linear is
    torchao's again, with its 8da4w group scales bfloat16-exact as XNNPACK stores them."""
    import tomllib

    from conftest import quant_rules
    from torchao.quantization import IntxUnpackedToInt8Tensor

    from exporter.backends import get_backend
    from exporter.kv_cache import CachedAttention
    from exporter.load import load_model
    from exporter.quant.apply import build_quantized

    raw = {"name": "x", "model": {"source": str(tiny_checkpoints["qwen3"])}, "target": {"name": "executorch"}}
    raw["quant"] = tomllib.loads(quant_rules("int8_dynact_int4_weight"))["quant"]
    loaded = load_model(str(tiny_checkpoints["qwen3"]))
    backend = get_backend("executorch")
    lm, _ = build_quantized(loaded, recipe_from_dict(raw), backend)
    before = {name: m.weight.scale.clone() for name, m in lm.named_modules() if hasattr(m, "weight")
              and isinstance(m.weight, IntxUnpackedToInt8Tensor)}
    raw["quant"]["tuning"] = {"steps": 2, "learning_rate": 0.01}
    lm, _ = build_quantized(loaded, recipe_from_dict(raw), backend)
    after = {name: m.weight.scale for name, m in lm.named_modules() if hasattr(m, "weight")
             and isinstance(m.weight, IntxUnpackedToInt8Tensor)}
    assert set(after) == set(before) and "model.layers.0.self_attn.qkv_proj" in after
    for name, scale in after.items():
        assert not torch.equal(scale, before[name]), f"{name}: no gradient reached its scales"
        if name != "model.embed_tokens":  # group-wise Linear scales: what XNNPACK stores
            assert torch.equal(scale, scale.to(torch.bfloat16).float()), name
    assert not any("forward" in m.__dict__ or m._forward_pre_hooks for m in lm.modules())  # their own forward again
    assert all(m.attention == "custom_sdpa" for m in lm.modules() if isinstance(m, CachedAttention))


@pytest.mark.parametrize("width,bias", [(64, True), (200, False)])
def test_weights_computed_inside_the_matmul_give_the_gradients_of_the_whole_weight(width, bias, monkeypatch):
    """_DequantLinear and _DequantEmbedding (the weight rebuilt from its codes, in row slices,
    forward and backward) against autograd through the whole dequantized matrix; 200 inputs
    in groups of 32: a padded last group."""
    from exporter.quant import tuning

    monkeypatch.setattr(tuning, "_SLICE_ELEMENTS", 5 * width)  # 5 rows a slice: several slices
    rng = torch.Generator().manual_seed(0)
    groups = -(-width // 32)
    centred = torch.randint(-8, 8, (24, groups, 32), generator=rng, dtype=torch.int8)
    scales = torch.rand(24, groups, generator=rng, dtype=torch.float64) + 0.1
    x = torch.randn(3, 7, width, generator=rng, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64) if bias else None
    leaf = scales.clone().requires_grad_(True)
    out = tuning._DequantLinear.apply(x, centred, leaf, width, b)
    direct_leaf = scales.clone().requires_grad_(True)
    direct_x = x.detach().clone().requires_grad_(True)
    direct = torch.nn.functional.linear(direct_x, tuning.dequantized(centred, direct_leaf, width), b)
    torch.testing.assert_close(out, direct)
    upstream = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    out.backward(upstream)
    direct.backward(upstream)
    torch.testing.assert_close(leaf.grad, direct_leaf.grad)
    torch.testing.assert_close(x.grad, direct_x.grad)

    ids = torch.tensor([[3, 0, 3, 23]])
    leaf.grad, direct_leaf.grad = None, None
    rows = tuning._DequantEmbedding.apply(ids, centred, leaf, width)
    direct_rows = torch.nn.functional.embedding(ids, tuning.dequantized(centred, direct_leaf, width))
    torch.testing.assert_close(rows, direct_rows)
    upstream = torch.randn(rows.shape, generator=rng, dtype=torch.float64)
    rows.backward(upstream)
    direct_rows.backward(upstream)
    torch.testing.assert_close(leaf.grad, direct_leaf.grad)  # row 3 twice: its gradients summed


def test_a_step_that_raises_the_kl_is_undone_and_the_rate_halved(tiny_checkpoints):
    """A learning rate far too large for the model: the steps that overshoot are undone, the
    rate halves each time, and the result is never worse than the quantized model it started from."""
    import tomllib

    from conftest import quant_rules

    from exporter.backends import get_backend
    from exporter.load import load_model
    from exporter.quant import apply

    raw = {"name": "x", "model": {"source": str(tiny_checkpoints["llama"])}, "target": {"name": "onnx"},
           "quant": tomllib.loads(quant_rules("int8_dynact_int4_weight", embedding="int4_weight"))["quant"]}
    raw["quant"]["tuning"] = {"steps": 6, "learning_rate": 0.9}
    messages = []
    loaded = load_model(str(tiny_checkpoints["llama"]))
    lm = apply.float_decoder(loaded.model, recipe_from_dict(raw), get_backend("onnx"))
    quantized = apply.quantize_decoder(lm, loaded, recipe_from_dict(raw), get_backend("onnx"), messages.append)
    record = quantized.summary.tuning
    assert record["steps_undone"] >= 1
    assert sum("step undone, learning rate halved" in m for m in messages) == record["steps_undone"]
    assert record["calibration_kl_after"] <= record["calibration_kl_before"]
    kls = [float(m.split("calibration KL ")[1].split()[0]) for m in messages if m.startswith("tune ")]
    assert record["calibration_kl_after"] == pytest.approx(min(kls), abs=1e-4)
