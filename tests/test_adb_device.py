"""The adb transport as far as this machine can take it: no phone or Android emulator can
be had here (no system image reaches it), so these check the commands it builds and that
every way a device can be missing ends in one line. device_tests/test_adb.py runs the real
adb client against no device."""

from __future__ import annotations

import pytest

from exporter.devices import get_device
from exporter.devices.adb import REMOTE_ROOT, AdbDevice, parse_serial, state_problem
from exporter.errors import UsageError


def test_the_commands_it_runs():
    device = get_device("adb:emulator-5554")
    assert isinstance(device, AdbDevice) and device.spec == "adb:emulator-5554"
    runner = f"{REMOTE_ROOT}/runners/executorch/et_runner"
    assert device.shell_command([runner, f"{REMOTE_ROOT}/artifacts/int4/model.pte", "4"]) == [
        "adb", "-s", "emulator-5554", "shell", "-T",
        "/data/local/tmp/recgpt/runners/executorch/et_runner /data/local/tmp/recgpt/artifacts/int4/model.pte 4"]
    # arguments with spaces or quotes reach the device's shell as one word each
    assert device.shell_command(["rm", "-rf", "/data/local/tmp/recgpt/a b"])[-1] == \
        "rm -rf '/data/local/tmp/recgpt/a b'"
    assert device.command("push", "x", "y") == ["adb", "-s", "emulator-5554", "push", "x", "y"]
    assert device.python() is None and device.interpreter() is None


@pytest.mark.parametrize("spec", ["adb:", "adb:two words", "adb:a;rm -rf /"])
def test_a_malformed_serial_is_one_line(spec):
    with pytest.raises(UsageError, match="is not of the form adb:SERIAL"):
        parse_serial(spec)


def test_what_get_state_says_is_named():
    # adb 29's own words for each state
    assert state_problem("X", 0, "device\n", "") is None
    assert "no device 'X' is attached" in state_problem("X", 1, "", "error: device 'X' not found\n")
    assert state_problem("X", 1, "", "error: device offline\n") == "device 'X' is offline"
    assert "has not authorised" in state_problem("X", 1, "", "error: device unauthorized.\n")
    assert "not ready" in state_problem("X", 0, "bootloader\n", "")


def test_without_adb_installed_verify_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no adb on it
    (tmp_path / "art").mkdir()
    device = AdbDevice("adb:R58M123")
    with pytest.raises(UsageError, match="adb is not installed") as caught:
        device.describe()
    assert "apt-get install adb" in caught.value.hint
    code, _, err = cli("device", "setup", "adb:R58M123")
    assert code == 2 and "adb is not installed" in err and "Traceback" not in err
