"""Widths a group size does not divide (a held-out checkpoint: hidden 80, intermediate 200,
group 32): every target quantizes such a layer, as quant.indivisible says, passes its
lowering gates on the real runtime, and the quant summary names each such layer."""

from __future__ import annotations

import json

import pytest
from conftest import quant_rules, write_recipe
from tiny_models import make_tiny_checkpoint

GATES = ("[parity]\nlowering_max_abs_diff = 0.1\nlowering_cosine_min = 0.999\nlowering_top1_min = 0.98\n"
         "quality_top1_min = 0.0\nquality_kl_mean_max = 10.0\n")
CASES = {
    # target header + rules -> what the summary must say of down_proj (input width 200)
    "executorch": ("", quant_rules("int8_dynact_int4_weight", embedding="int4_weight"), "pad"),
    # asymmetric int4 linears (XNNPACK: GroupOffsetLinear), the embedding symmetric int8
    "executorch-asym": ("", quant_rules("int8_dynact_int4_weight", symmetric=False).replace(
        'scheme = "int8_weight"\ngroup_size = 32\nsymmetric = false', 'scheme = "int8_weight"'), "pad"),
    "onnx": ('[target]\nname = "onnx"\n', quant_rules("int4_weight", embedding="int4_weight", symmetric=False), "pad"),
    "onnx-per-channel": ('[target]\nname = "onnx"\n[quant]\nindivisible = "per_channel"\n',
                         quant_rules("int8_dynact_int4_weight"), "per_channel"),
    "coreml": ('[target]\nname = "coreml"\n', quant_rules("int4_weight", embedding="int4_weight"), "per_channel"),
}


@pytest.fixture(scope="module")
def odd_widths(tmp_path_factory):
    return make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("odd") / "ckpt", seed=3, hidden_size=80,
                                intermediate_size=200, head_dim=32)


@pytest.mark.parametrize("case", list(CASES))
def test_every_target_quantizes_widths_its_groups_do_not_divide(odd_widths, tmp_path, case):
    from exporter.pipeline import export, verify
    from exporter.recipe_io import load_recipe

    header, rules, down_proj_action = CASES[case]
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", f"odd-{case}", header + rules + GATES))
    folder = export(recipe, out_dir=tmp_path / "art", model=str(odd_widths))
    summary = json.loads((folder / "manifest.json").read_text())["quantization"]
    entries = {e["module"]: e for e in summary["indivisible"]}
    down = entries["model.layers.0.mlp.down_proj"]
    assert down["width"] == 200 and down["group_size"] == 32 and down["action"] == down_proj_action
    assert down["stored_group_size"] == (32 if down_proj_action == "pad" else 200)
    assert "lm_head" in entries  # input width 80: every module the rules quantize is listed or divides
    assert summary["float"] == [] or all(n not in entries for n in summary["float"])  # none skipped silently
    report = verify(folder, prompts=2, decode_steps=4)
    assert report.passed, report.failures


def test_refuse_is_still_there_and_pad_needs_a_target_with_partial_groups(cli, odd_widths, tmp_path):
    refuse = write_recipe(tmp_path / "refuse.toml", "odd-refuse", '[quant]\nindivisible = "refuse"\n'
                          + quant_rules("int8_dynact_int4_weight"))
    code, _, err = cli("export", refuse, "--model", odd_widths, "--out", tmp_path / "a")
    assert code == 3 and "group_size: 32 does not divide the input width 80 of model.layers.0.self_attn" in err
    assert 'quant.indivisible = "per_channel"' in err and not (tmp_path / "a").exists()
    pad = write_recipe(tmp_path / "pad.toml", "odd-pad", '[target]\nname = "coreml"\n[quant]\nindivisible = "pad"\n'
                       + quant_rules("int4_weight"))
    code, _, err = cli("export", pad, "--model", odd_widths, "--out", tmp_path / "b")
    assert code == 5 and "quant.indivisible: padding a partial last group is not supported by the coreml target" in err
    assert "(supported by: executorch, onnx)" in err and not (tmp_path / "b").exists()
    per_channel = write_recipe(tmp_path / "pc.toml", "odd-pc", '[quant]\nindivisible = "per_channel"\n'
                               + quant_rules("int8_dynact_int4_weight"))
    code, _, err = cli("export", per_channel, "--model", odd_widths, "--out", tmp_path / "c")
    assert code == 5 and "XNNPACK runs int4 groups of multiples of 32 only" in err and not (tmp_path / "c").exists()


@pytest.mark.parametrize("symmetric", [True, False])
def test_executorch_per_channel_where_the_row_is_a_multiple_of_32(tiny_checkpoints, tmp_path, symmetric):
    """The tiny model's 64-wide layers with group 128: one group per row; asymmetric, the
    offset Linear then has one input (kept float: torchao cannot quantize it)."""
    from exporter.pipeline import export, verify
    from exporter.recipe_io import load_recipe

    rules = quant_rules("int8_dynact_int4_weight", group_size=128, symmetric=symmetric).replace(
        'scheme = "int8_weight"\ngroup_size = 128\nsymmetric = false', 'scheme = "int8_weight"')
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", "pc", '[quant]\nindivisible = "per_channel"\n'
                                      + rules + GATES))
    folder = export(recipe, out_dir=tmp_path / "art", model=str(tiny_checkpoints["llama"]))
    entries = json.loads((folder / "manifest.json").read_text())["quantization"]["indivisible"]
    assert {(e["action"], e["stored_group_size"]) for e in entries} == {("per_channel", 64)}
    report = verify(folder, prompts=2, decode_steps=4)
    assert report.passed, report.failures
