"""Checkpoints we refuse end in one clear line and a distinct exit code, with nothing written."""

from __future__ import annotations

import json
import shutil

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
