"""The contract every registered target keeps (exporter/backends/base.py), run for each one.

A new target is added to the registry and then passes this module before anything else:
its declarations are consistent, its refusals follow from them in one message shape, and a
float tiny model goes through quantize -> lower -> load_runner to the same logits as the
eager reference on the target's real runtime.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from exporter.backends import backend_class, get_backend, known_targets, targets_with
from exporter.backends.base import Backend, Capabilities, Quantized, check_recipe
from exporter.errors import RecipeError, UnsupportedError
from exporter.manifest import IOSignature, KVCacheShape
from exporter.quant.schemes import MODULE_KINDS, SCHEMES
from exporter.recipe_io import recipe_from_dict, recipe_to_dict

TARGETS = known_targets()
# The float program's logits against the eager reference: float32 targets to 1e-3; Core ML
# computes in fp16 (docs/targets/coreml.md).
FLOAT_TOLERANCE = {"coreml": 5e-2}


def test_every_target_is_registered_once_with_its_own_package():
    assert TARGETS == sorted(set(TARGETS)) and len(TARGETS) >= 3
    for name in TARGETS:
        cls = backend_class(name)
        assert issubclass(cls, Backend) and cls.name == name
        assert cls.__module__.startswith(f"exporter.backends.{name}."), "a target lives in its own package"
        assert cls.options_class.__module__.startswith(f"exporter.backends.{name}.")


@pytest.mark.parametrize("target", TARGETS)
def test_declarations_are_consistent(target):
    cls = backend_class(target)
    assert isinstance(cls.capabilities, Capabilities)
    assert dataclasses.is_dataclass(cls.options_class) and cls.options_class.__dataclass_params__.frozen
    for kind in MODULE_KINDS:
        stored = cls.storage[kind]
        assert "float" in stored, f"{target} must store float {kind} layers"
        for scheme in stored:
            assert kind in SCHEMES[scheme].kinds, f"{target} stores {scheme} for {kind}, which the scheme excludes"
            assert stored[scheme].description
    for scheme in cls.capabilities.asymmetric:
        assert any(cls.stores(scheme, kind) for kind in MODULE_KINDS)
    for scheme in cls.refusal_reasons:
        assert scheme in SCHEMES


@pytest.mark.parametrize("target", TARGETS)
def test_options_round_trip_through_the_recipe(target):
    recipe = recipe_from_dict({"name": "x", "target": {"name": target}})
    assert isinstance(recipe.target.options, backend_class(target).options_class)
    data = recipe_to_dict(recipe)
    assert set(data["target"]) == {"name", target}
    assert recipe_from_dict(data) == recipe
    other = next(t for t in TARGETS if t != target)
    with pytest.raises(RecipeError, match=rf"target\.{other}: options of the {other} target"):
        recipe_from_dict({"name": "x", "target": {"name": target, other: {}}})


@pytest.mark.parametrize("target", TARGETS)
def test_refusals_follow_the_declared_capabilities(target):
    """Each optional feature: accepted where declared, refused where not, in one shape."""
    caps = backend_class(target).capabilities
    features = {
        "scale_search": {"quant": {"scale_search": {"method": "activation"}}},
        "tuning": {"quant": {"tuning": {"steps": 1}}},
        "lm_head_split": {"quant": {"lm_head_split": 8}},
        "int8_kv_cache": {"kv_cache": {"dtype": "int8"}},
    }
    for capability, table in features.items():
        recipe = recipe_from_dict({"name": "x", "target": {"name": target}, **table})
        if getattr(caps, capability):
            check_recipe(recipe)
            assert target in targets_with(capability)
        else:
            with pytest.raises(UnsupportedError, match=rf"^(quant|kv_cache)\.\w+: .+ is not supported by the {target} "
                                                       "target"):
                check_recipe(recipe)
            assert target not in targets_with(capability)


@pytest.mark.parametrize("target", TARGETS)
def test_every_scheme_is_either_stored_or_refused(target):
    cls = backend_class(target)
    for scheme, described in SCHEMES.items():
        for kind in described.kinds:
            recipe = recipe_from_dict({"name": "x", "target": {"name": target},
                                       "quant": {"rules": [{"match": "*", "kind": kind, "scheme": scheme}]}})
            if cls.stores(scheme, kind):
                check_recipe(recipe)
            else:
                with pytest.raises(UnsupportedError, match=rf"^quant\.rules\[0\]\.scheme: {scheme} for {kind} layers"):
                    check_recipe(recipe)


@pytest.mark.parametrize("target", TARGETS)
def test_a_float_model_lowers_and_runs_as_the_eager_reference(target, tiny_checkpoints, tmp_path):
    """quantize -> lower -> load_runner on the target's own runtime, through the typed contract."""
    from conftest import write_recipe

    from exporter.artifact import read_artifact
    from exporter.load import load_model
    from exporter.pipeline import export
    from exporter.quant.apply import build_quantized
    from exporter.recipe_io import load_recipe
    from exporter.runners import EagerRunner

    recipe = load_recipe(write_recipe(tmp_path / "r.toml", f"contract-{target}", f'[target]\nname = "{target}"\n'))
    folder = export(recipe, out_dir=tmp_path / "art", model=str(tiny_checkpoints["qwen3"]))
    artifact = read_artifact(folder)
    backend = get_backend(target)
    manifest = artifact.manifest
    assert manifest.target.name == target and (folder / manifest.roles["program"]).exists()
    assert isinstance(manifest.io_signature, IOSignature) and isinstance(manifest.io_signature.kv_cache, KVCacheShape)

    loaded = load_model(tiny_checkpoints["qwen3"])
    lm, quantized = build_quantized(loaded, recipe, backend)
    assert isinstance(quantized, Quantized) and quantized.summary.quantized_count() == 0
    cache = manifest.io_signature.kv_cache
    assert (cache.layers, cache.kv_heads, cache.head_dim, cache.max_seq_len) == \
        (lm.shape.n_layers, lm.shape.n_kv_heads, lm.shape.head_dim, lm.max_seq_len)
    backend.prepare_reference(lm, quantized, artifact)

    prompt = [5, 17, 33, 60, 100, 7, 9, 12]
    runner, eager = backend.load_runner(artifact), EagerRunner(lm)
    tolerance = FLOAT_TOLERANCE.get(target, 1e-3)
    np.testing.assert_allclose(runner.prefill(prompt), eager.prefill(prompt), rtol=0, atol=tolerance)
    np.testing.assert_allclose(runner.decode(42, len(prompt)), eager.decode(42, len(prompt)), rtol=0, atol=tolerance)
    encode, decode = backend.shipped_tokenizer(artifact)
    assert decode(encode("用户搜索 无线蓝牙耳机")) == "用户搜索 无线蓝牙耳机"
    assert backend.runtime_name()

