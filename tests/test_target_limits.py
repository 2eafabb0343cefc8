"""Shapes a target's runtime cannot execute are refused at export, in one line, before any
weight is loaded; the same model exports for a target that runs it."""

from __future__ import annotations

import time

import pytest
from conftest import write_recipe
from tiny_models import make_tiny_checkpoint

ONNX = '[target]\nname = "onnx"\n'


@pytest.fixture(scope="module")
def head_dim_24(tmp_path_factory):
    """A Qwen3 with head_dim 24 (as a held-out checkpoint had): GroupQueryAttention's CPU
    kernel in onnxruntime 1.32 takes only multiples of 16."""
    return make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("hd24") / "ckpt", seed=7, head_dim=24)


def test_onnx_refuses_a_head_dim_its_attention_kernel_cannot_run(cli, head_dim_24, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", "hd24-onnx", ONNX)
    t0 = time.perf_counter()
    code, _, err = cli("export", recipe, "--model", head_dim_24, "--out", tmp_path / "out")
    took = time.perf_counter() - t0
    assert code == 5 and "the onnx target cannot run this model's attention (head_dim 24, 4 heads, 2 KV heads)" in err
    assert "head_size shall be a multiple of 16" in err and "another target" in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[-2]]
    assert "Traceback" not in err and took < 10  # no weights loaded, nothing quantized
    assert not (tmp_path / "out").exists()


def test_the_probe_follows_the_runtime():
    from types import SimpleNamespace

    from exporter.backends.onnx.limits import attention_problem

    runs = [d for d in (16, 24, 32, 40, 48, 64, 80, 96, 128) if attention_problem(
        SimpleNamespace(n_heads=4, n_kv_heads=2, head_dim=d), 23) is None]
    assert runs == [16, 32, 48, 64, 80, 96, 128]
    assert "multiple of kv_num_heads" in attention_problem(SimpleNamespace(n_heads=6, n_kv_heads=4, head_dim=64), 23)
    assert "even head_dim" in attention_problem(SimpleNamespace(n_heads=4, n_kv_heads=2, head_dim=33), 23)


def test_the_same_model_runs_on_executorch(head_dim_24, tmp_path):
    from exporter.pipeline import export, verify
    from exporter.recipe_io import load_recipe

    recipe = load_recipe(write_recipe(tmp_path / "r.toml", "hd24-et", "[parity]\nquality_top1_min = 1.0\n"))
    folder = export(recipe, out_dir=tmp_path / "art", model=str(head_dim_24))
    report = verify(folder, prompts=2, decode_steps=4)
    assert report.passed, report.failures
