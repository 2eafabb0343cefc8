"""Typed records: the manifest and the reports read back what was written, and older
manifests (version 1) still read."""

from __future__ import annotations

import pytest

from exporter.manifest import MANIFEST_VERSION, ArtifactManifest, manifest_from_json
from exporter.records import RecordError, from_json, to_json

# A version-1 manifest as exports before the typed manifest wrote it (trimmed: two files).
VERSION_1 = {
    "manifest_version": 1, "name": "smollm2-135m-coreml-fp16", "created": "2026-11-28T10:00:00+00:00",
    "recipe": {"schema_version": 1, "name": "smollm2-135m-coreml-fp16", "description": "",
               "target": {"name": "coreml", "backend": "mlprogram", "executorch": {"fuse_projections": True},
                          "coreml": {"compute_units": "all", "deployment_target": "iOS18"},
                          "onnx": {"opset": 23, "fuse_projections": True}}},
    "model": {"source": "builtin:smollm2-135m-instruct", "checkpoint_dir": "/c", "weights_sha256": "ab",
              "architecture": "llama", "vocab_size": 49152, "n_layers": 30, "hidden_size": 576, "max_seq_len": 512,
              "max_prefill_len": 256, "bos_id": 1, "eos_ids": [2]},
    "target": {"name": "coreml", "backend": "mlprogram"},
    "roles": {"program": "model.mlpackage", "tokenizer": "tokenizer.json"},
    "io_signature": {"inputs": [{"name": "tokens", "dtype": "int32", "shape": [1, "seq_len<= 256"]}],
                     "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, 49152]}],
                     "state": {"kv_cache": [30, 2, 1, 512, 3, 64],
                               "coreml_states": "k_cache_<layer>, v_cache_<layer>: fp16"}},
    "quantization": {"rules": [], "float": [], "unmatched": []},
    "runtime_constants": {"get_max_seq_len": 512},
    "environment": {"packages": {}}, "timings_s": {"load": 1.0},
    "files": {"tokenizer.json": {"sha256": "00", "bytes": 3},
              "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin": {"sha256": "11", "bytes": 5}},
}


def test_a_version_1_manifest_reads_as_version_2():
    manifest = manifest_from_json(VERSION_1)
    assert manifest.manifest_version == MANIFEST_VERSION
    assert manifest.target.name == "coreml" and manifest.target.info == {}
    cache = manifest.io_signature.kv_cache
    assert (cache.layers, cache.kinds, cache.batch, cache.max_seq_len, cache.kv_heads, cache.head_dim) == \
        (30, 2, 1, 512, 3, 64)
    assert manifest.io_signature.state_layout.startswith("k_cache_<layer>")
    assert manifest.recipe["target"] == {"name": "coreml", "coreml": {"compute_units": "all",
                                                                      "deployment_target": "iOS18"}}
    assert manifest.model.eos_ids == (2,) and manifest.bytes_of_role("program") == 5
    # ... and writes as version 2, which reads back to the same record.
    assert manifest_from_json(to_json(manifest)) == manifest


def test_executorch_constant_methods_move_into_the_target_facts():
    data = {**VERSION_1, "target": {"name": "executorch", "backend": "xnnpack"},
            "recipe": {**VERSION_1["recipe"], "target": {"name": "executorch", "backend": "xnnpack",
                                                         "executorch": {"fuse_projections": False}}}}
    manifest = manifest_from_json(data)
    assert manifest.target.info == {"constant_methods": {"get_max_seq_len": 512}}
    assert manifest.recipe["target"] == {"name": "executorch", "executorch": {"fuse_projections": False}}


def test_a_truncated_or_unknown_manifest_is_refused_by_name():
    data = to_json(manifest_from_json(VERSION_1))
    del data["model"]["weights_sha256"]
    with pytest.raises(RecordError, match=r"manifest\.model: missing field 'weights_sha256'"):
        from_json(ArtifactManifest, data, "manifest")
    with pytest.raises(ValueError, match="manifest_version 7 is not one this tool reads"):
        manifest_from_json({**VERSION_1, "manifest_version": 7})


def test_a_bad_manifest_is_an_artifact_error(tmp_path, cli):
    import json

    (tmp_path / "manifest.json").write_text(json.dumps({**VERSION_1, "manifest_version": 7}))
    code, _, err = cli("inspect", tmp_path)
    assert code == 2 and "manifest_version 7 is not one this tool reads" in err
    assert "hint: export the artifact again with this version" in err
