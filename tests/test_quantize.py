"""Ordered quantization rules: first match wins, float is explicit, the summary counts everything."""

from __future__ import annotations

import pytest

from exporter.backends.executorch.options import ExecuTorchOptions
from exporter.backends.executorch.quantizer import apply_quantization
from exporter.decoder import build_decoder
from exporter.errors import RecipeError
from exporter.load import load_model
from exporter.quant.plan import plan
from exporter.spec import QuantRule, QuantSpec


@pytest.fixture
def lm(tiny_checkpoints):
    loaded = load_model(tiny_checkpoints["qwen3"])
    return build_decoder(loaded.model, max_seq_len=32, max_prefill_len=8, attention="sdpa", cache_update="index_copy")


def test_first_match_wins_and_summary(lm):
    spec = QuantSpec(rules=(
        QuantRule(match="model.layers.0.*", kind="linear", scheme="float"),
        QuantRule(match="model.embed_tokens", kind="embedding", scheme="int4_weight", group_size=32),
        QuantRule(match="model.layers.*", kind="linear", scheme="int8_dynact_int4_weight", group_size=32),
        QuantRule(match="nothing.*", scheme="int8_weight"),
    ))
    summary = apply_quantization(lm, spec).to_dict()
    counts = [r["matched"] for r in summary["rules"]]
    assert counts == [7, 1, 7, 0]  # 7 linears per layer; the last rule matched nothing
    assert summary["unmatched"] == ["lm_head"]
    assert "model.layers.0.self_attn.q_proj" in summary["float"] and "lm_head" in summary["float"]
    assert type(lm.model.layers[1].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(lm.model.layers[0].mlp.up_proj.weight).__name__ == "Parameter"


def test_a_group_size_that_does_not_divide(lm):
    # tiny intermediate_size is 128, hidden 64: group 128 does not divide the 64-wide inputs.
    rules = (QuantRule(match="*", kind="linear", scheme="int8_dynact_int4_weight", group_size=128),)
    with pytest.raises(RecipeError, match=r"quant\.rules\[0\]\.group_size: 128 does not divide the input width 64"):
        plan(lm, QuantSpec(rules=rules, indivisible="refuse"))
    summary = plan(lm, QuantSpec(rules=rules, indivisible="per_channel"))
    q_proj = next(e for e in summary.indivisible if e["module"] == "model.layers.0.self_attn.q_proj")
    assert q_proj == {"module": "model.layers.0.self_attn.q_proj", "width": 64, "group_size": 128,
                      "action": "per_channel", "stored_group_size": 64, "groups_per_row": 1}
    assert summary.rules[0].group_size_of("model.layers.0.self_attn.q_proj") == 64
    assert summary.rules[0].group_size_of("model.layers.0.mlp.down_proj") == 128  # 128 wide: divides
    padded = plan(lm, QuantSpec(rules=rules, indivisible="pad")).indivisible[0]
    assert padded["action"] == "pad" and padded["stored_group_size"] == 128 and padded["groups_per_row"] == 1


def test_linear_scheme_on_embedding_is_refused(lm):
    spec = QuantSpec(rules=(QuantRule(match="*", scheme="int8_dynact_int8_weight"),))
    with pytest.raises(RecipeError, match="applies to linear layers, but it matched embedding model.embed_tokens"):
        plan(lm, spec)


def test_int4_groups_put_the_extreme_on_a_level(lm):
    import torch

    reference = {n: m.weight.detach().clone() for n, m in lm.named_modules() if n.startswith("model.layers.1.")
                 and isinstance(m, torch.nn.Linear)}
    spec = QuantSpec(rules=(QuantRule(match="model.layers.1.*", kind="linear", scheme="int8_dynact_int4_weight",
                                      group_size=32),))
    apply_quantization(lm, spec)
    modules = dict(lm.named_modules())
    for name, w in reference.items():
        q = modules[name].weight
        codes, scales = q.qdata.float(), q.scale.float()
        assert codes.min() >= -8 and codes.max() <= 7 and (scales > 0).all()
        assert torch.equal(scales, scales.to(torch.bfloat16).float())  # what XNNPACK stores
        groups = w.reshape(w.shape[0], -1, 32)
        deq = q.dequantize().reshape(groups.shape)
        step = scales.reshape(*scales.shape, 1)
        # Round to nearest: within half a step (plus the bf16 rounding of the scale), except
        # positive values beyond 7 steps in a group whose extreme is negative: those clip to +7.
        clipped = groups > 7.5 * step
        assert ((deq - groups).abs() <= step * 0.5 * (1 + 2**-7) + 1e-7)[~clipped].all(), name
        assert (codes.reshape(groups.shape)[clipped] == 7).all()
        # The group's largest-magnitude value sits on the -8 level (negative) or the +7 level (positive).
        extreme_code = torch.gather(codes.reshape(groups.shape), -1, groups.abs().argmax(-1, keepdim=True))
        assert set(extreme_code.unique().tolist()) <= {-8.0, 7.0}, name


def test_asymmetric_int4_groups_reproduce_a_min_max_grid():
    """A weight on a Q4_1-style grid (w = d * q + m per group of 32, q in 0..15: what the
    embedded SmolLM2 is) comes back up to the bfloat16 rounding of d; symmetric groups cannot follow it."""
    import torch

    from exporter.backends.executorch.quantizer import int4_group_levels, int4_group_offsets

    g = torch.Generator().manual_seed(0)
    n, k = 48, 64
    d = torch.rand(n, k // 32, 1, generator=g) * 0.02 + 0.001
    m = -torch.rand(n, k // 32, 1, generator=g) * 0.15
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15  # every group spans the whole grid
    w = (d * q + m).reshape(n, k)
    codes, scales, offsets = int4_group_offsets(w, 32)
    assert codes.min() >= -8 and codes.max() <= 7
    assert torch.equal(scales, scales.to(torch.bfloat16).float())
    deq = (codes.float().reshape(n, -1, 32) * scales[..., None] + offsets[..., None]).reshape(n, k)
    err = (deq - w).abs().max()
    assert err <= 8 * d.max() * 2**-8  # the bf16 rounding of d, times at most 8 steps from the offset
    sym_codes, sym_scales = int4_group_levels(w, 32, linear=True)
    sym = (sym_codes.float().reshape(n, -1, 32) * sym_scales[..., None]).reshape(n, k)
    assert (sym - w).abs().max() > 10 * err


def test_asymmetric_rule_wraps_linears_with_group_offsets(lm):
    import torch

    from exporter.backends.executorch.quantizer import GroupOffsetLinear, materialize_for_eager

    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1))
    up = lm.model.layers[1].mlp.up_proj
    expected = up(x)
    spec = QuantSpec(rules=(QuantRule(match="model.layers.1.mlp.*", kind="linear", scheme="int8_dynact_int4_weight",
                                      group_size=32, symmetric=False),))
    summary = apply_quantization(lm, spec).to_dict()
    assert summary["rules"][0]["matched"] == 3 and summary["rules"][0]["symmetric"] is False
    wrapped = lm.model.layers[1].mlp.up_proj
    assert isinstance(wrapped, GroupOffsetLinear) and wrapped.main is up
    codes = wrapped.group_sum.weight.qdata
    assert (codes.shape == (2, 64) and codes.sum() == 64
            and torch.equal(wrapped.group_sum.weight.scale.float(), torch.ones(2, 2)))
    quantized = wrapped(x)
    # Random float weights are not on a grid: the result is close to float, not equal.
    assert torch.nn.functional.cosine_similarity(quantized.flatten(), expected.flatten(), dim=0) > 0.99
    materialize_for_eager(lm)  # the eager reference path computes the same values
    assert torch.allclose(lm.model.layers[1].mlp.up_proj(x), quantized, atol=1e-5)


def test_lm_head_split_keeps_the_logits_and_names_both_parts(lm):
    import torch

    from exporter.backends.base import check_recipe
    from exporter.decoder import split_lm_head
    from exporter.errors import UnsupportedError
    from exporter.recipe_io import recipe_from_dict

    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
    before = lm.lm_head(x)
    vocab = lm.lm_head.out_features
    with pytest.raises(RecipeError, match=rf"quant\.lm_head_split: {vocab} must lie between 1 and"):
        split_lm_head(lm, vocab)
    split_lm_head(lm, 100)
    assert torch.allclose(lm.lm_head(x), before, atol=1e-6, rtol=0)  # the same rows; GEMM blocking may differ
    spec = QuantSpec(lm_head_split=100, rules=(
        QuantRule(match="lm_head.head", kind="linear", scheme="int8_dynact_int8_weight"),
        QuantRule(match="lm_head.*", kind="linear", scheme="int8_dynact_int4_weight", group_size=32),
    ))
    summary = plan(lm, spec).to_dict()
    assert [r["modules"] for r in summary["rules"]] == [["lm_head.head"], ["lm_head.tail"]]
    with pytest.raises(RecipeError, match=r"quant\.lm_head_split: must be 0"):
        QuantSpec(lm_head_split=-1)
    recipe = recipe_from_dict({"name": "x", "quant": {"lm_head_split": 100}, "target": {"name": "onnx"}})
    with pytest.raises(UnsupportedError, match=r"quant\.lm_head_split: splitting the lm_head is not supported by "
                                               r"the onnx target \(supported by: executorch\)"):
        check_recipe(recipe)


def test_executorch_fuses_only_projections_that_share_a_rule(lm):
    # v_proj of layer 0 gets its own rule: that layer's q/k/v stay three Linears, its gate/up
    # and every other layer's groups are fused and fall under the rule of their parts.
    from exporter.backends.executorch.backend import ExecuTorchBackend

    spec = QuantSpec(rules=(
        QuantRule(match="model.layers.0.self_attn.v_proj", kind="linear", scheme="int8_dynact_int8_weight"),
        QuantRule(match="model.layers.*", kind="linear", scheme="int8_dynact_int4_weight", group_size=32),
    ))
    summary = ExecuTorchBackend().quantize(lm, spec, ExecuTorchOptions()).summary.to_dict()
    layer0, layer1 = lm.model.layers[0], lm.model.layers[1]
    assert layer0.self_attn.qkv_proj is None and hasattr(layer0.self_attn, "v_proj")
    assert layer1.self_attn.qkv_proj is not None and layer0.mlp.gate_up_proj is not None
    assert summary["rules"][0]["modules"] == ["model.layers.0.self_attn.v_proj"]
    assert "model.layers.1.self_attn.qkv_proj" in summary["rules"][1]["modules"]
    assert summary["fused"]["model.layers.0.mlp.gate_up_proj"] == ["model.layers.0.mlp.gate_proj",
                                                                    "model.layers.0.mlp.up_proj"]
    assert "model.layers.0.self_attn.qkv_proj" not in summary["fused"]
    # Quantization is per output row, so the fused weight is the parts' weights stacked.
    assert type(layer1.self_attn.qkv_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"


def test_executorch_keeps_projections_apart_when_the_recipe_says_so(lm):
    from exporter.backends.executorch.backend import ExecuTorchBackend

    spec = QuantSpec(rules=(QuantRule(match="model.layers.*", kind="linear", scheme="int8_dynact_int4_weight",
                                      group_size=32),))
    summary = ExecuTorchBackend().quantize(lm, spec, ExecuTorchOptions(fuse_projections=False)).summary.to_dict()
    assert summary["fused"] == {}
    assert all(layer.self_attn.qkv_proj is None and layer.mlp.gate_up_proj is None for layer in lm.model.layers)
    assert "model.layers.1.mlp.up_proj" in summary["rules"][0]["modules"]


def test_a_rule_that_matches_no_module_is_warned_about(tiny_checkpoints):
    """A glob with a typo quantizes nothing: the export says so (a warning line, not an error:
    a generic recipe may carry a rule for modules some architectures lack)."""
    import tomllib

    from conftest import quant_rules

    from exporter.backends import get_backend
    from exporter.load import load_model
    from exporter.quant import apply
    from exporter.recipe_io import recipe_from_dict

    rules = tomllib.loads(quant_rules("int8_dynact_int4_weight"))["quant"]["rules"]
    typo = {"match": "model.layer.*.mlp.*", "kind": "linear", "scheme": "int8_dynact_int8_weight"}
    recipe = recipe_from_dict({"name": "x", "target": {"name": "onnx"}, "quant": {"rules": [typo, *rules]}})
    loaded = load_model(str(tiny_checkpoints["llama"]))
    lm = apply.float_decoder(loaded.model, recipe, get_backend("onnx"))
    messages = []
    apply.quantize_decoder(lm, loaded, recipe, get_backend("onnx"), messages.append)
    warnings = [m for m in messages if m.startswith("warning")]
    assert warnings == ['warning: quant.rules[0] (match = "model.layer.*.mlp.*", kind = "linear") matched no module '
                        "and does nothing; `recgpt-export inspect` lists the module names"]
