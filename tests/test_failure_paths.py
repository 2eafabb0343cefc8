"""Failure paths of a real export, each ending in one line, its exit code and nothing left
behind: a full disk, SIGTERM at several stages, two exports into one folder, and a run with no
network at all (docs/errors.md)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_recipe

ROOT = os.geteuid() == 0


def export_cmd(recipe, checkpoint, out) -> list[str]:
    return [sys.executable, "-m", "exporter.cli", "export", str(recipe), "--model", str(checkpoint), "--out", str(out)]


@pytest.mark.skipif(not ROOT or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_one_line_exit_9_and_leaves_nothing(tiny_checkpoints, tmp_path):
    """A 256 KiB tmpfs: the tiny model's 640 KB program does not fit."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        recipe = write_recipe(tmp_path / "r.toml", "full")
        proc = subprocess.run(export_cmd(recipe, tiny_checkpoints["qwen3"], small / "art"),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 9, proc.stderr
        assert "no space left on device" in proc.stderr and "nothing was left behind" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert list(small.iterdir()) == []  # no artifact, no partial folder, no lock
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.parametrize("stage", ["quantize", "capture (torch.export)", "lower to XNNPACK"])
def test_sigterm_at_each_stage_leaves_nothing(tiny_checkpoints, tmp_path, stage):
    recipe = write_recipe(tmp_path / "r.toml", "term")
    out = tmp_path / "outdir" / "art"
    proc = subprocess.Popen(export_cmd(recipe, tiny_checkpoints["llama"], out), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in proc.stderr:  # the stage lines: "[   1.2s] lower"
        seen.append(line)
        if line.strip().endswith(f"] {stage}"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert any(line.strip().endswith(f"] {stage}") for line in seen), "".join(seen) + err
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list((tmp_path / "outdir").iterdir()) == []


def test_two_exports_into_one_folder_one_wins(tiny_checkpoints, tmp_path):
    from exporter.artifact import read_artifact

    recipe = write_recipe(tmp_path / "r.toml", "race")
    out = tmp_path / "outdir" / "art"
    first = subprocess.Popen(export_cmd(recipe, tiny_checkpoints["qwen3"], out), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "outdir" / ".art.lock"
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(export_cmd(recipe, tiny_checkpoints["qwen3"], out), capture_output=True, text=True,
                            timeout=300)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2 and "another recgpt-export process is writing" in second.stderr, second.stderr
    read_artifact(out)  # the winner's files all match their manifest
    assert sorted(p.name for p in (tmp_path / "outdir").iterdir()) == ["art"]  # the lock is gone


@pytest.mark.skipif(not ROOT or shutil.which("unshare") is None, reason="a network namespace needs root")
def test_export_verify_bench_run_with_no_network(tiny_checkpoints, tmp_path):
    """Inside `unshare -n` (a network namespace with no interface but a down loopback), nothing
    we drive may need the network: no hub, no install, no upload."""
    cli = [sys.executable, "-m", "exporter.cli"]
    recipe = write_recipe(tmp_path / "r.toml", "offline")
    env = {**os.environ, "RECGPT_EXPORT_CACHE": str(tmp_path / "cache")}
    for args in (["export", str(recipe), "--model", str(tiny_checkpoints["qwen3"]), "--out", str(tmp_path / "art")],
                 ["verify", str(tmp_path / "art"), "--prompts", "1", "--decode-steps", "2"],
                 ["bench", str(tmp_path / "art"), "--runs", "1", "--warmup", "0"]):
        proc = subprocess.run(["unshare", "-n", *cli, *args], capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, f"{args[0]}: {proc.stderr[-2000:]}"
