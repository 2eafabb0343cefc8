"""Recipe loading is strict: unknown keys, wrong types and bad values fail with the dotted path."""

from __future__ import annotations

import pytest

from exporter.backends.base import check_recipe
from exporter.errors import RecipeError, UsageError
from exporter.recipe_io import apply_override, list_recipe_files, load_recipe, recipe_from_dict


def test_shipped_recipes_load():
    names = {p.stem for p in list_recipe_files()}
    assert {"executorch-xnnpack-fp32", "executorch-xnnpack-int8", "executorch-xnnpack-int4"} <= names
    assert {"coreml-fp16", "coreml-int8", "coreml-int4"} <= names
    for path in list_recipe_files():
        recipe = load_recipe(path)
        generic = path.parent.name in ("executorch", "onnx", "coreml")
        # the folder (any model) or the file name (the demo model's) says the target
        assert recipe.target.name == (path.parent.name if generic else path.stem.split("-")[0])
        assert (recipe.model.source == "") == generic
        check_recipe(recipe)  # and that target accepts it


@pytest.mark.parametrize(("generic", "demo"), [("executorch/int4", "executorch-xnnpack-int4"),
                                               ("onnx/int4", "onnx-int4"), ("coreml/int4", "coreml-int4"),
                                               ("executorch/int8", "executorch-xnnpack-int8"),
                                               ("onnx/fp32", "onnx-fp32"), ("coreml/fp16", "coreml-fp16")])
def test_recipes_for_any_model_are_the_demo_models_settings(generic, demo):
    from exporter.recipe_io import recipe_to_dict

    a, b = recipe_to_dict(load_recipe(generic)), recipe_to_dict(load_recipe(f"smollm2-135m/{demo}"))
    # A task gate is measured on one model's eval (docs/intent.md): the demo recipes may carry
    # one, a recipe for any model never does.
    assert a["task"]["agreement_min"] == 0.0
    for d in (a, b):
        d.pop("name"), d["model"].pop("source"), d.pop("task")
    assert a == b


def test_a_recipe_that_names_no_model_needs_model(cli, tmp_path):
    code, _, err = cli("export", "executorch/int4", "--out", tmp_path / "art")
    assert code == 2 and "recipe 'executorch-int4' names no model" in err and "--model" in err
    assert not (tmp_path / "art").exists()


def test_int4_recipe_rules_in_order():
    r = load_recipe("smollm2-135m/executorch-xnnpack-int4")
    assert [(x.match, x.scheme) for x in r.quant.rules] == [
        ("model.embed_tokens", "int8_weight"),
        ("lm_head", "int8_dynact_int4_weight"),
        ("model.layers.*", "int8_dynact_int4_weight"),
    ]
    assert all(x.group_size == 32 for x in r.quant.rules[1:])


def test_unknown_key_names_dotted_path_and_suggests():
    with pytest.raises(RecipeError, match=r"kv_cache\.max_seq_lenn: unknown key; did you mean 'max_seq_len'\?"):
        recipe_from_dict({"name": "x", "kv_cache": {"max_seq_lenn": 3}})


def test_wrong_type_and_bad_value():
    with pytest.raises(RecipeError, match=r"kv_cache\.max_seq_len: expected int, got str"):
        recipe_from_dict({"name": "x", "kv_cache": {"max_seq_len": "big"}})
    with pytest.raises(RecipeError, match=r"quant\.rules\[0\]\.scheme: 'int3' is not a linear scheme"):
        recipe_from_dict({"name": "x", "quant": {"rules": [{"match": "*", "kind": "linear", "scheme": "int3"}]}})
    with pytest.raises(RecipeError, match=r"quant\.rules\[0\]\.group_size: 48 is not one of 32, 64, 128"):
        recipe_from_dict({"name": "x", "quant": {"rules": [{"match": "*", "scheme": "int8_dynact_int4_weight",
                                                            "group_size": 48}]}})
    with pytest.raises(RecipeError, match=r"kv_cache\.max_prefill_len: must be between 1 and"):
        recipe_from_dict({"name": "x", "kv_cache": {"max_seq_len": 64, "max_prefill_len": 64}})
    with pytest.raises(RecipeError, match=r"recipe: missing required key name"):
        recipe_from_dict({})


def test_set_overrides_any_field():
    r = load_recipe("smollm2-135m/executorch-xnnpack-int4",
                    ["kv_cache.max_seq_len=1024", "quant.rules.1.scheme=int8_dynact_int8_weight",
                     "description=hello world"])
    assert r.kv_cache.max_seq_len == 1024
    assert r.quant.rules[1].scheme == "int8_dynact_int8_weight"
    assert r.description == "hello world"


def test_bad_overrides():
    with pytest.raises(UsageError, match="not of the form"):
        apply_override({}, "novalue")
    with pytest.raises(UsageError, match="is not an index"):
        apply_override({"quant": {"rules": []}}, "quant.rules.3.scheme=float")
    with pytest.raises(RecipeError, match=r"kv_cache\.nope: unknown key"):
        load_recipe("smollm2-135m/executorch-xnnpack-fp32", ["kv_cache.nope=1"])


def test_missing_recipe_suggests_close_name():
    with pytest.raises(UsageError, match="not found") as info:
        load_recipe("smollm2-135m/executorch-xnnpack-int5")
    assert "executorch-xnnpack-int4" in info.value.hint or "executorch-xnnpack-int8" in info.value.hint


def test_cli_recipes_list_and_show(cli):
    code, out, _ = cli("recipes", "list")
    assert code == 0 and "executorch" in out
    code, out, _ = cli("recipes", "show", "smollm2-135m/executorch-xnnpack-int8", "--set", "bench.runs=9")
    assert code == 0 and '"runs": 9' in out


def test_cli_bad_recipe_exit_code(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('schema_version = 1\nname = "x"\n[kv_cache]\nmax_seq_lne = 4\n')
    code, _, err = cli("export", bad, "--out", tmp_path / "out")
    assert code == 3
    assert "kv_cache.max_seq_lne: unknown key; did you mean 'max_seq_len'?" in err
    assert not (tmp_path / "out").exists()


def test_target_options_belong_to_their_target():
    r = recipe_from_dict({"name": "x", "target": {"name": "coreml", "coreml": {"compute_units": "cpu_and_ne"}}})
    assert r.target.options.compute_units == "cpu_and_ne"
    with pytest.raises(RecipeError, match=r"target\.coreml: options of the coreml target, "
                                          r"but target\.name is 'executorch'"):
        recipe_from_dict({"name": "x", "target": {"coreml": {"compute_units": "all"}}})
    with pytest.raises(RecipeError, match=r"target\.coreml\.compute_units: 'gpu' is not one of"):
        recipe_from_dict({"name": "x", "target": {"name": "coreml", "coreml": {"compute_units": "gpu"}}})
    with pytest.raises(RecipeError, match=r"target\.executorch: options of the executorch target, "
                                          r"but target\.name is 'onnx'"):
        recipe_from_dict({"name": "x", "target": {"name": "onnx", "executorch": {"fuse_projections": False}}})
    assert not (recipe_from_dict({"name": "x", "target": {"executorch": {"fuse_projections": False}}})
                .target.options.fuse_projections)
    with pytest.raises(RecipeError, match=r"target\.backend: no longer a recipe field"):
        recipe_from_dict({"name": "x", "target": {"name": "onnx", "backend": "cpu"}})
    with pytest.raises(RecipeError, match=r"target\.onnx\.opst: unknown key; did you mean 'opset'\?"):
        recipe_from_dict({"name": "x", "target": {"name": "onnx", "onnx": {"opst": 23}}})


def test_executorch_refuses_weight_only_linear_and_asymmetric():
    from exporter.errors import UnsupportedError

    asymmetric = (r"symmetric: asymmetric \S+ is not supported by the executorch target; "
                  r".*asymmetric here: int8_dynact_int4_weight")
    for rule, message in (({"scheme": "int4_weight"},
                           "int4_weight for linear layers .weight-only int4 linears are not correct"),
                          ({"scheme": "int8_weight"},
                           "int8_weight for linear layers .weight-only int8 linears are not correct"),
                          ({"scheme": "int8_dynact_int8_weight", "symmetric": False}, asymmetric),
                          ({"scheme": "int4_weight", "kind": "embedding", "symmetric": False}, asymmetric)):
        recipe = recipe_from_dict({"name": "x", "quant": {"rules": [{"match": "*", "kind": "linear", **rule}]}})
        with pytest.raises(UnsupportedError, match=message):
            check_recipe(recipe)
    # int4 linears carry their zero points as group offsets (GroupOffsetLinear).
    check_recipe(recipe_from_dict({"name": "x", "quant": {"rules": [
        {"match": "*", "kind": "linear", "scheme": "int8_dynact_int4_weight", "symmetric": False}]}}))


@pytest.mark.parametrize("table", ['[quant.smoothing]\nalpha = 0.5', '[quant.scale_search]\nmethod = "activation"',
                                   "[quant.tuning]\nsteps = 2"])
def test_missing_calibration_file_is_one_line_before_any_work(cli, tiny_checkpoints, tmp_path, table):
    """Every table that reads calibration text checks its file before the export starts
    (quant.calibration.with_absolute_calibration)."""
    from conftest import quant_rules, write_recipe

    extra = ('[target]\nname = "onnx"\n' + quant_rules("int4_weight", embedding="int4_weight")
             + f'{table}\ncalibration = "{tmp_path / "none.txt"}"\n')
    recipe = write_recipe(tmp_path / "r.toml", "x", extra)
    code, _, err = cli("export", recipe, "--model", tiny_checkpoints["qwen3"], "--out", tmp_path / "art")
    name = table.split("]")[0].lstrip("[")
    assert code == 2 and f"{name}.calibration: " in err and "is not a file" in err
    assert not (tmp_path / "art").exists()
