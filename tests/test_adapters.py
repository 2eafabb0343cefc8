"""A LoRA adapter (PEFT) merged into its base at export: a tiny adapter made here, on the
tiny seeded checkpoints; refused in one line when it is pickled or made for another base."""

from __future__ import annotations

import json

import pytest
from conftest import write_recipe


def make_adapter(checkpoint, out, *, seed: int = 0):
    """A rank-4 LoRA adapter on q/v/down projections, its B matrices random (PEFT starts them
    at zero, which would merge to the base itself)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECGPT_EXPORT_CACHE", str(tmp_path / "cache"))  # merged checkpoints go here


def test_export_merges_the_adapter_and_verify_finds_it_again(cli, tiny_checkpoints, tmp_path, cache):
    from safetensors.torch import load_file

    adapter = make_adapter(tiny_checkpoints["llama"], tmp_path / "adapter")
    recipe = write_recipe(tmp_path / "r.toml", "tiny-adapted", "[parity]\nquality_top1_min = 1.0\n")
    code, out, err = cli("export", recipe, "--model", tiny_checkpoints["llama"], "--adapter", adapter,
                         "--out", tmp_path / "art")
    assert code == 0, err
    model = json.loads((tmp_path / "art" / "manifest.json").read_text())["model"]
    assert model["adapter"] == str(adapter.resolve()) and len(model["adapter_sha256"]) == 64
    assert model["base_weights_sha256"] and model["base_weights_sha256"] != model["weights_sha256"]
    merged = next((tmp_path / "cache" / "merged").iterdir())
    base = load_file(tiny_checkpoints["llama"] / "model.safetensors")
    weights = load_file(merged / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not (weights[name] == base[name]).all()  # merged: W + B A * alpha / r
    assert (weights["model.layers.0.self_attn.k_proj.weight"] == base["model.layers.0.self_attn.k_proj.weight"]).all()
    code, out, err = cli("verify", tmp_path / "art")  # the reference is rebuilt from base + adapter
    assert code == 0, out + err


def test_an_adapter_for_another_base_is_one_line(cli, tiny_checkpoints, tmp_path, cache):
    adapter = make_adapter(tiny_checkpoints["qwen3"], tmp_path / "adapter")  # q_proj 64 -> 128 there, 64 -> 64 here
    recipe = write_recipe(tmp_path / "r.toml", "tiny-wrong-adapter")
    code, _, err = cli("export", recipe, "--model", tiny_checkpoints["llama"], "--adapter", adapter,
                       "--out", tmp_path / "art")
    assert code == 4 and "does not fit the base" in err and "Traceback" not in err
    assert not (tmp_path / "art").exists() and not list((tmp_path / "cache").glob("merged/*"))


def test_a_pickled_adapter_is_refused(cli, tiny_checkpoints, tmp_path, cache):
    adapter = make_adapter(tiny_checkpoints["llama"], tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    recipe = write_recipe(tmp_path / "r.toml", "tiny-pickled-adapter")
    code, _, err = cli("export", recipe, "--model", tiny_checkpoints["llama"], "--adapter", adapter,
                       "--out", tmp_path / "art")
    assert code == 4 and "adapter_model.bin is a pickle" in err and not (tmp_path / "art").exists()


def test_a_builtin_with_its_own_adapter_accepts_that_adapter_only(tmp_path):
    """verify passes the manifest's adapter back with a builtin that carries it."""
    from exporter.errors import UsageError
    from exporter.load import BUILTIN_ADAPTED, resolve_checkpoint

    name, (_, own) = next(iter(BUILTIN_ADAPTED.items()))
    assert own.is_dir() and (own / "adapter_model.safetensors").is_file()
    with pytest.raises(UsageError, match="already carries its adapter"):
        resolve_checkpoint(f"builtin:{name}", adapter=tmp_path)


def test_verify_merges_a_builtins_own_adapter_whatever_path_the_manifest_recorded():
    """The manifest records the adapter's path where it was first merged (another checkout,
    another machine); verify of a builtin that carries its own adapter does not pass that
    path back (a fresh clone's make demo failed on it), and the merged weights' digest still
    proves the checkpoint the same."""
    from exporter.load import BUILTIN_ADAPTED, carries_own_adapter

    name = next(iter(BUILTIN_ADAPTED))
    assert carries_own_adapter(f"builtin:{name}")
    assert not carries_own_adapter("builtin:smollm2-135m-instruct") and not carries_own_adapter(f"/models/{name}")
