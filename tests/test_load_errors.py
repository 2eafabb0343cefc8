"""Checkpoints we refuse end in one clear line and a distinct exit code, with nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import write_recipe


def _export(cli, tmp_path, model):
    recipe = write_recipe(tmp_path / "r.toml", "err")
    return cli("export", recipe, "--model", model, "--out", tmp_path / "out")


def test_missing_model_path(cli, tmp_path):
    code, _, err = _export(cli, tmp_path, tmp_path / "nope")
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoint_refused(cli, tmp_path, tiny_checkpoints):
    ckpt = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    code, _, err = _export(cli, tmp_path, ckpt)
    assert code == 4
    assert "pytorch_model.bin is a pickle checkpoint; recgpt-export never unpickles weights" in err
    assert "safe_serialization=True" in err
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors(cli, tmp_path, tiny_checkpoints):
    ckpt = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = _export(cli, tmp_path, ckpt)
    assert code == 4 and "not a valid safetensors file (corrupt or truncated)" in err
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(cli, tmp_path, tiny_checkpoints):
    ckpt = tmp_path / "gpt2"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (ckpt / "config.json").write_text(json.dumps(config))
    code, _, err = _export(cli, tmp_path, ckpt)
    assert code == 4
    assert "architecture 'gpt2' (GPT2LMHeadModel) is not supported; supported: llama, qwen2, qwen3" in err


def test_weight_only_int8_linear_refused_for_executorch(cli, tmp_path, tiny_checkpoints):
    recipe = write_recipe(tmp_path / "r.toml", "w8",
                          '[[quant.rules]]\nmatch = "*"\nkind = "linear"\nscheme = "int8_weight"\n')
    code, _, err = cli("export", recipe, "--model", tiny_checkpoints["llama"], "--out", tmp_path / "out")
    assert code == 5 and "int8_weight for linear layers (weight-only int8 linears are not correct on XNNPACK" in err
    assert not (tmp_path / "out").exists()


def test_verify_on_a_folder_that_is_not_an_artifact(cli, tmp_path):
    code, _, err = cli("verify", tmp_path)
    assert code == 2 and "has no manifest.json" in err
    code, _, err = cli("verify", tmp_path / "missing")
    assert code == 2 and "does not exist" in err


def test_index_copy_cache_refused_for_executorch(cli, tmp_path, tiny_checkpoints):
    recipe = write_recipe(tmp_path / "r.toml", "aten")
    code, _, err = cli("export", recipe, "--model", tiny_checkpoints["llama"], "--out", tmp_path / "out",
                       "--set", "kv_cache.attention=sdpa", "--set", "kv_cache.cache_update=index_copy")
    assert code == 5 and "'index_copy' builds a program that aborts the ExecuTorch 1.5.1 runtime" in err
    assert not (tmp_path / "out").exists()


def _gguf(path, architecture: str, *, tensor_bytes: int = 1 << 20):
    """A GGUF file written by the gguf package: its architecture, some metadata of every
    kind the header reader must skip, and one tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_uint32("test.block_count", 2)
    writer.add_array("test.ids", [1, 2, 3])
    writer.add_array("test.words", ["a", "bb"])
    writer.add_float32("test.eps", 1e-6)
    writer.add_tensor("token_embd.weight", np.zeros(tensor_bytes // 4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_unsupported_gguf_is_refused_from_its_header(cli, tmp_path, monkeypatch):
    """Read from the header before the file is hashed or converted: under a second, and the
    conversion cache stays empty (a 1 GB Gemma3 GGUF took 46 s to be refused before)."""
    import time

    from exporter.load import gguf_architecture

    monkeypatch.setenv("RECGPT_EXPORT_CACHE", str(tmp_path / "cache"))
    model = _gguf(tmp_path / "gemma.gguf", "gemma3", tensor_bytes=64 << 20)
    assert gguf_architecture(model) == "gemma3"
    t0 = time.perf_counter()
    code, _, err = _export(cli, tmp_path, model)
    assert time.perf_counter() - t0 < 5.0  # measured: 0.07 s; the bound leaves room for a loaded CI machine
    assert code == 4 and "gemma.gguf: architecture 'gemma3' (GGUF general.architecture) is not supported" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_a_truncated_or_foreign_gguf_is_one_line(cli, tmp_path):
    model = _gguf(tmp_path / "m.gguf", "llama")
    (tmp_path / "cut.gguf").write_bytes(model.read_bytes()[:40])
    code, _, err = _export(cli, tmp_path, tmp_path / "cut.gguf")
    assert code == 4 and "ends inside its GGUF header" in err
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not gguf")
    code, _, err = _export(cli, tmp_path, tmp_path / "fake.gguf")
    assert code == 4 and "is not a GGUF file" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_weight_that_is_not_finite_is_refused_naming_it(cli, tmp_path, tiny_checkpoints, bad):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "diverged"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, :2] = bad
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    code, _, err = _export(cli, tmp_path, ckpt)
    assert code == 4 and "model.layers.1.mlp.down_proj.weight holds 2 NaN or infinite value(s)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
