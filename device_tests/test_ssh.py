"""The ssh transport against a real sshd this test starts on 127.0.0.1 (Debian's
openssh-server, a throwaway host key and client key): setup copies the runner built for the
remote's architecture, verify and bench drive it over the ssh session, and nothing pushed for
a run stays on the remote."""

from __future__ import annotations

import glob
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import quant_rules, write_recipe

SSHD = "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(not Path(SSHD).exists() or shutil.which("ssh-keygen") is None,
                                reason="needs openssh-server (make device-test installs it)")
INT4_GATES = ("[parity]\nlowering_max_abs_diff = 0.1\nlowering_cosine_min = 0.999\nlowering_top1_min = 0.98\n"
              "quality_top1_min = 0.0\nquality_kl_mean_max = 10.0\n")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("sshd")
    for key in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    shutil.copy(root / "client.pub", root / "authorized_keys")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\n"
        f"PasswordAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        f"PidFile {root / 'sshd.pid'}\nSubsystem sftp /usr/lib/openssh/sftp-server\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    daemon = subprocess.Popen([SSHD, "-D", "-f", str(root / "sshd_config"), "-E", str(root / "log")])
    monkeypatch_module.setenv("RECGPT_SSH_KEY", str(root / "client"))
    monkeypatch_module.setenv("RECGPT_SSH_KNOWN_HOSTS", str(root / "known_hosts"))
    time.sleep(1)
    yield f"ssh://{user}@127.0.0.1:{port}"
    daemon.terminate()
    daemon.wait(timeout=10)


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def test_verify_and_bench_over_ssh(sshd, tiny_checkpoints, tmp_path, cli):
    from exporter.devices import ssh
    from exporter.pipeline import export, verify
    from exporter.recipe_io import load_recipe

    state = ssh.setup(sshd)
    assert state["runners"] == {target: f"{ssh.REMOTE_RUNNERS}/{target}" for target in ("executorch", "onnx")}
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", "tiny-qwen3-int4",
                                      quant_rules("int8_dynact_int4_weight") + INT4_GATES))
    folder = export(recipe, out_dir=tmp_path / "art", model=str(tiny_checkpoints["qwen3"]))
    before = set(glob.glob("/tmp/recgpt-artifact-*"))
    report = verify(folder, device=sshd, prompts=2, decode_steps=8, greedy_tokens=8)
    assert report.passed, report.failures
    assert report.device_facts.kind == "ssh" and report.device_facts.name == sshd
    assert report.device_vs_host.top1_agreement == 1.0 and report.device_vs_host.cosine_min >= 0.9999
    code, out, _ = cli("bench", folder, "--device", sshd, "--runs", "2", "--warmup", "0")
    assert code == 0 and "decode_tok_s" in out
    assert set(glob.glob("/tmp/recgpt-artifact-*")) == before  # nothing pushed for a run stays


def test_onnx_over_ssh_runs_the_remote_python(sshd, tiny_checkpoints, tmp_path):
    """The ONNX runner is a script: setup unpacked the pinned onnxruntime and numpy wheels for
    the remote's platform and python3 beside it, so the remote needs only a python3."""
    from exporter.devices import ssh
    from exporter.pipeline import export, verify
    from exporter.recipe_io import load_recipe

    ssh.setup(sshd)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", "tiny-llama-onnx-int4", '[target]\nname = "onnx"\n'
                                      + quant_rules("int4_weight", symmetric=False) + INT4_GATES))
    folder = export(recipe, out_dir=tmp_path / "art", model=str(tiny_checkpoints["llama"]))
    report = verify(folder, device=sshd, prompts=2, decode_steps=8, greedy_tokens=8)
    assert report.passed, report.failures
    assert report.device_facts.runner.startswith("ort_runner.py sha256:")
    # the same onnxruntime build on the same CPU in another process: the same bits
    assert report.device_vs_host.max_abs_diff == 0.0


def test_an_unreachable_host_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("RECGPT_SSH_KNOWN_HOSTS", str(tmp_path / "known_hosts"))
    code, _, err = cli("device", "setup", "ssh://nobody@127.0.0.1:1")
    assert code == 2 and "ssh://nobody@127.0.0.1:1: `uname -m" in err and "without a password" in err
