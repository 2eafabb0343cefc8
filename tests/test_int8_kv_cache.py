"""kv_cache.dtype = "int8": each target's program against an eager reference that quantizes
the cache the same way, the memory ExecuTorch plans for it, and the target that refuses it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import write_recipe

from exporter.errors import UnsupportedError


def export_both(target: str, checkpoint, root) -> dict:
    """The tiny model exported for ``target`` with a float32 and an int8 cache: dtype -> (recipe, folder)."""
    from exporter.pipeline import export
    from exporter.recipe_io import load_recipe

    recipe = load_recipe(write_recipe(root / "r.toml", f"kv8-{target}", f'[target]\nname = "{target}"\n'))
    out = {}
    for dtype in ("float32", "int8"):
        dtype_recipe = replace(recipe, kv_cache=replace(recipe.kv_cache, dtype=dtype))
        out[dtype] = (dtype_recipe, export(dtype_recipe, out_dir=root / dtype, model=str(checkpoint)))
    return out


@pytest.fixture(scope="module")
def exports(tiny_checkpoints, tmp_path_factory):
    return export_both("executorch", tiny_checkpoints["qwen3"], tmp_path_factory.mktemp("kv8"))


@pytest.fixture(scope="module")
def onnx_exports(tiny_checkpoints, tmp_path_factory):
    return export_both("onnx", tiny_checkpoints["qwen3"], tmp_path_factory.mktemp("kv8-onnx"))


@pytest.mark.parametrize("target", ["executorch", "onnx"])
def test_the_int8_cache_program_computes_what_its_reference_computes(target, exports, onnx_exports,
                                                                     tiny_checkpoints):
    """ExecuTorch (per-token scales, llama::custom_quantized_sdpa) and onnxruntime (fixed
    per-channel scales calibrated at export, GroupQueryAttention's int8 cache)."""
    from exporter.artifact import read_artifact
    from exporter.backends import get_backend
    from exporter.load import load_model
    from exporter.quant.apply import build_quantized
    from exporter.runners import EagerRunner

    backend, loaded = get_backend(target), load_model(tiny_checkpoints["qwen3"])
    recipe, folder = (exports if target == "executorch" else onnx_exports)["int8"]
    artifact = read_artifact(folder)
    cache = artifact.manifest.io_signature.kv_cache
    assert (cache.dtype, cache.scales) == ("int8", "per_token" if target == "executorch" else "static")
    lm, quantized = build_quantized(loaded, recipe, backend)
    backend.prepare_reference(lm, quantized, artifact)
    float_lm, _ = build_quantized(loaded, (exports if target == "executorch" else onnx_exports)["float32"][0], backend)
    runner, reference, float_cache = backend.load_runner(artifact), EagerRunner(lm), EagerRunner(float_lm)
    prompt = [5, 17, 33, 60, 100, 7, 9, 12] * 5  # 40 tokens: two prefill chunks of 32 and 8
    got, want, unquantized = [runner.prefill(prompt)], [reference.prefill(prompt)], [float_cache.prefill(prompt)]
    for i in range(6):
        pos = len(prompt) + i
        got.append(runner.decode(42 + i, pos))
        want.append(reference.decode(42 + i, pos))
        unquantized.append(float_cache.decode(42 + i, pos))
    lowering = np.abs(np.stack(got) - np.stack(want)).max()
    quantization = np.abs(np.stack(want) - np.stack(unquantized)).max()
    assert lowering <= 1e-3  # the program's ops are the reference's
    assert quantization > 10 * lowering  # and the cache really is int8: the reference moved off the float cache


def test_the_int8_cache_plans_less_memory(exports):
    """The program's memory plan holds the cache at the size the manifest's shape gives."""
    from exporter.artifact import read_artifact
    from exporter.backends.executorch.program import memory_plan

    plans = {}
    for dtype, (recipe, folder) in exports.items():
        plans[dtype] = memory_plan(folder / "model.pte", recipe.kv_cache.max_seq_len)
        assert plans[dtype]["cache_bytes"] == read_artifact(folder).manifest.io_signature.kv_cache.bytes_at(128)
    positions, layers, heads, head_dim = 128, 2, 2, 32
    assert plans["float32"]["cache_bytes"] == 2 * layers * positions * heads * head_dim * 4
    assert plans["int8"]["cache_bytes"] == 2 * layers * positions * heads * (head_dim + 5)  # + scale, zero point
    assert plans["float32"]["planned_bytes"] - plans["int8"]["planned_bytes"] > 0.8 * (
        plans["float32"]["cache_bytes"] - plans["int8"]["cache_bytes"])  # the quantized query adds a little


def test_onnxruntime_genai_runs_the_int8_cache(onnx_exports):
    """The app's path: onnxruntime-genai allocates the int8 past/present buffers from the graph."""
    import onnxruntime_genai as og

    from exporter.artifact import read_artifact
    from exporter.backends import get_backend

    folder = onnx_exports["int8"][1]
    prompt = [5, 17, 33, 60, 100, 7, 9, 12]
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 4, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    generator.generate_next_token()
    runner = get_backend("onnx").load_runner(read_artifact(folder))
    assert int(generator.get_next_tokens()[0]) == int(np.argmax(runner.prefill(prompt)))


def test_core_ml_refuses_an_int8_cache_in_one_line():
    from exporter.backends.base import check_recipe
    from exporter.recipe_io import recipe_from_dict

    recipe = recipe_from_dict({"name": "x", "target": {"name": "coreml"}, "kv_cache": {"dtype": "int8"}})
    with pytest.raises(UnsupportedError, match=r"^kv_cache\.dtype: an int8 KV cache is not supported by the "
                                               r"coreml target \(supported by: executorch, onnx\)"):
        check_recipe(recipe)


def test_an_int8_cache_needs_the_custom_attention():
    from exporter.errors import RecipeError
    from exporter.recipe_io import recipe_from_dict

    with pytest.raises(RecipeError, match="kv_cache.dtype: an int8 cache is read by the quantized custom SDPA"):
        recipe_from_dict({"name": "x", "kv_cache": {"dtype": "int8", "attention": "sdpa"}})


def test_verify_adopts_the_onnx_artifacts_cache_scales(onnx_exports, cli):
    """verify's reference takes the fixed scales the artifact holds (not calibrated again)."""
    import json

    folder = onnx_exports["int8"][1]
    code, out, err = cli("verify", folder, "--prompts", "2", "--decode-steps", "4")
    lowering = json.loads((folder / "parity.json").read_text())["lowering"]
    assert code == 0, out + err
    assert lowering["max_abs_diff"] < 1e-4 and lowering["top1_agreement"] == 1.0
