"""The ssh device's command lines (device_tests/test_ssh.py runs it against a real sshd)."""

from __future__ import annotations

import pytest

from exporter.devices import get_device
from exporter.devices.ssh import SshDevice, SshTarget
from exporter.errors import UsageError


def test_a_device_spec_parses_to_user_host_and_port():
    assert SshTarget.parse("ssh://pi@board.local:2200") == SshTarget("pi", "board.local", 2200)
    assert SshTarget.parse("ssh://mac") == SshTarget(None, "mac", 22)
    assert str(SshTarget.parse("ssh://pi@board:22")) == "ssh://pi@board"
    with pytest.raises(UsageError, match=r"is not of the form ssh://\[user@\]host\[:port\]"):
        SshTarget.parse("ssh://a@b@c")


def test_commands_never_prompt_and_take_the_configured_key(monkeypatch):
    monkeypatch.setenv("RECGPT_SSH_KEY", "/keys/farm")
    monkeypatch.delenv("RECGPT_SSH_KNOWN_HOSTS", raising=False)
    device = get_device("ssh://ci@farm-7:2022")
    assert isinstance(device, SshDevice) and device.spec == "ssh://ci@farm-7:2022"
    command = device.ssh_command("uname -m")
    assert command[:1] == ["ssh"] and command[-2:] == ["ci@farm-7", "uname -m"]
    assert "BatchMode=yes" in command and ["-i", "/keys/farm"] == command[command.index("-i"):command.index("-i") + 2]
    assert ["-p", "2022"] == command[command.index("-p"):command.index("-p") + 2]
