"""The real adb client (Debian's `adb`, installed by `make device-test`) with no device
attached: the one case of the transport's failures this machine can produce for real. Its
own adb server port, stopped after, so no server is left running."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("adb") is None, reason="needs adb (make device-test installs it)")


@pytest.fixture
def adb_server(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(port))
    yield port
    subprocess.run(["adb", "kill-server"], capture_output=True, timeout=30)


def test_no_device_attached_is_one_line(adb_server, cli, tiny_checkpoints, tmp_path):
    code, _, err = cli("device", "setup", "adb:R58M123")
    assert code == 2 and "no device 'R58M123' is attached" in err and "adb devices" in err
    assert "Traceback" not in err
