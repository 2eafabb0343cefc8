"""The device layer on this machine: the device runners (ExecuTorch's native one, ONNX
Runtime's script) built for the host and run through the same protocol a phone or the ARM64
emulator runs them with (device_tests/ runs them under qemu). Real runtimes only: the
ExecuTorch runner links the installed executorch's libraries, the ONNX one imports the
installed onnxruntime."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import quant_rules, write_recipe

from exporter.devices.host import HostDevice

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the host runner needs g++")


class NativeHost(HostDevice):
    """The host, made to run artifacts the way a device without this tool's Python does."""

    kind = "native-host"

    def python(self):
        return None


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    from exporter.backends import backend_class

    root = tmp_path_factory.mktemp("runners")
    for target in ("executorch", "onnx"):
        backend_class(target).native_runner.build_for_host(root / target)
    return root


@pytest.fixture(scope="module")
def int4_artifact(tiny_checkpoints, tmp_path_factory):
    from exporter.pipeline import export
    from exporter.recipe_io import load_recipe

    root = tmp_path_factory.mktemp("native-int4")
    gates = ("[parity]\nlowering_max_abs_diff = 0.1\nlowering_cosine_min = 0.999\nlowering_top1_min = 0.98\n"
             "quality_top1_min = 0.0\nquality_kl_mean_max = 10.0\n")
    recipe = load_recipe(write_recipe(root / "r.toml", "tiny-llama-int4",
                                      quant_rules("int8_dynact_int4_weight") + gates))
    return export(recipe, out_dir=root / "art", model=str(tiny_checkpoints["llama"]))


def test_the_native_runner_computes_what_the_python_runtime_does(runners, int4_artifact):
    from exporter.artifact import read_artifact
    from exporter.backends import get_backend
    from exporter.devices.native import open_native_runner

    artifact = read_artifact(int4_artifact)
    backend = get_backend("executorch")
    device = NativeHost(runners)
    native, facts = open_native_runner(device, backend, artifact, threads=1)
    python = backend.load_runner(artifact)
    tokens = [5, 17, 33, 60, 100, 7, 9, 12] * 5  # 40 tokens: two prefill chunks of at most 32
    try:
        np.testing.assert_allclose(native.prefill(tokens), python.prefill(tokens), rtol=0, atol=1e-4)
        np.testing.assert_allclose(native.decode(42, 40), python.decode(42, 40), rtol=0, atol=1e-4)
        first_s, decode_s, steps = native.greedy_timed(tokens[:8], 5)
        assert steps == 4 and first_s > 0 and decode_s > 0
    finally:
        native.close()
    assert facts.kind == "native-host" and facts.runner.startswith("et_runner sha256:")
    assert native.vocab == 384 and native.threads == 1


def test_the_onnx_script_runner_computes_what_the_python_runtime_does(runners, tiny_checkpoints, tmp_path):
    from exporter.artifact import read_artifact
    from exporter.backends import get_backend
    from exporter.devices.native import open_native_runner
    from exporter.pipeline import export
    from exporter.recipe_io import load_recipe

    recipe = load_recipe(write_recipe(tmp_path / "r.toml", "tiny-onnx-int4", '[target]\nname = "onnx"\n'
                                      + quant_rules("int4_weight", symmetric=False)))
    artifact = read_artifact(export(recipe, out_dir=tmp_path / "art", model=str(tiny_checkpoints["qwen3"])))
    backend = get_backend("onnx")
    native, facts = open_native_runner(NativeHost(runners), backend, artifact, threads=1)
    python = backend.load_runner(artifact, threads=1)
    tokens = [5, 17, 33, 60, 100, 7, 9, 12] * 5
    try:
        # The same library and kernels in another process: the same bits.
        np.testing.assert_array_equal(native.prefill(tokens), python.prefill(tokens))
        np.testing.assert_array_equal(native.decode(42, 40), python.decode(42, 40))
        first_s, decode_s, steps = native.greedy_timed(tokens[:8], 5)
        assert steps == 4 and first_s > 0 and decode_s > 0
    finally:
        native.close()
    assert facts.runner.startswith("ort_runner.py sha256:") and native.threads == 1


def test_verify_on_a_device_compares_with_the_host_run(runners, int4_artifact):
    from exporter.pipeline import verify

    report = verify(int4_artifact, device=NativeHost(runners), prompts=2, decode_steps=4)
    assert report.passed, report.failures
    assert report.compared.prompts == 2 and report.compared.decode_steps == 4
    vs_host = report.device_vs_host
    # Same kernels but the llama ops (the runner's own, another summation order): ulp-level
    # differences, which int8 dynamic activations turn into an occasional flipped code, the
    # size of the reference's own noise floor (measured: max abs 1.3e-2, cosine 0.99997).
    assert vs_host.positions == 2 * 5 and vs_host.top1_agreement == 1.0 and vs_host.cosine_min >= 0.9999
    assert vs_host.max_abs_diff <= max(1e-3, 2 * report.lowering.noise_floor.max_abs_diff)
    saved = json.loads((int4_artifact / "parity.json").read_text())
    assert saved["device_facts"]["runner"].startswith("et_runner sha256:") and "device_vs_host" in saved


def test_bench_on_a_device_is_timed_by_its_runner(runners, int4_artifact):
    from exporter.pipeline import bench

    report = bench(int4_artifact, runs=2, warmup=0, device=NativeHost(runners))
    assert report.decode_tokens == 23 and report.decode_tok_s.median > 0 and report.ttft_ms.median > 0
    assert report.device_facts.kind == "native-host" and report.peak_rss_mb > 0


def test_a_device_that_is_not_set_up_is_one_line(cli, int4_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("RECGPT_DEVICES_DIR", str(tmp_path / "none"))
    code, _, err = cli("verify", int4_artifact, "--device", "arm64-emu")
    assert code == 2 and "device arm64-emu is not set up" in err and "device setup arm64-emu" in err
    code, _, err = cli("bench", int4_artifact, "--device", "pixel-9")
    assert code == 2 and "unknown device 'pixel-9'" in err
    code, _, err = cli("verify", int4_artifact, "--device", "ssh://a@b@c")
    assert code == 2 and "is not of the form ssh://[user@]host[:port]" in err


def test_a_target_without_a_native_runner_is_refused(runners, tiny_checkpoints, tmp_path):
    from exporter.errors import UnsupportedError
    from exporter.pipeline import export, verify
    from exporter.recipe_io import load_recipe

    recipe = load_recipe(write_recipe(tmp_path / "r.toml", "tiny-coreml", '[target]\nname = "coreml"\n'))
    folder = export(recipe, out_dir=tmp_path / "art", model=str(tiny_checkpoints["qwen3"]))
    with pytest.raises(UnsupportedError, match="the coreml target has no native runner for host yet"):
        verify(folder, device=NativeHost(runners))


def test_a_runner_that_dies_is_a_stage_error(runners, int4_artifact, tmp_path):
    from exporter.artifact import read_artifact
    from exporter.backends import get_backend
    from exporter.devices.native import open_native_runner
    from exporter.errors import StageError

    broken = tmp_path / "art"
    shutil.copytree(int4_artifact, broken)
    (broken / "model.pte").write_bytes(b"not a program")
    artifact = read_artifact(broken, check_hashes=False)
    with pytest.raises(StageError, match="the device runner et_runner answered: ERROR cannot load method forward"):
        open_native_runner(NativeHost(runners), get_backend("executorch"), artifact, threads=1)


def test_emulator_setup_without_its_tools_names_them_and_builds_nothing(tmp_path, monkeypatch, cli):
    from exporter.devices import arm64_emu
    from exporter.errors import UsageError

    monkeypatch.setattr(arm64_emu.shutil, "which", lambda _tool: None)
    monkeypatch.setattr(arm64_emu.os, "geteuid", lambda: 1000)  # not root: no apt-get
    root = tmp_path / "devices" / "arm64-emu"
    with pytest.raises(UsageError, match="needs qemu-aarch64-static, aarch64-linux-gnu-g\\+\\+") as caught:
        arm64_emu.setup(root)
    assert "qemu-user-static and g++-aarch64-linux-gnu" in caught.value.hint
    assert not root.exists() and not any((tmp_path / "devices").glob(".arm64-emu.partial-*"))
    with pytest.raises(UsageError, match="unknown CPU model 'cortex-x4'"):
        arm64_emu.setup(root, cpu="cortex-x4")
    monkeypatch.setenv("RECGPT_DEVICES_DIR", str(tmp_path / "devices"))
    code, out, _ = cli("device", "remove", "arm64-emu")
    assert code == 0 and "arm64-emu was not set up" in out
    code, out, _ = cli("device", "list")
    assert code == 0 and "not set up" in out


def test_emulator_cpu_models_take_qemu_feature_switches():
    from exporter.devices.arm64_emu import check_cpu
    from exporter.errors import UsageError

    for cpu in ("max", "max,sme=off", "max,sve=off,sme=off", "cortex-a76"):
        check_cpu(cpu)
    for cpu, message in (("cortex-x9", "unknown CPU model"), ("max,sme", "is not NAME=on or NAME=off"),
                         ("max,sme=maybe", "is not NAME=on or NAME=off"), ("max,s;rm=off", "NAME=on")):
        with pytest.raises(UsageError, match=message):
            check_cpu(cpu)
