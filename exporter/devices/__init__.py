"""Where an artifact is checked: the host, an ARM64 emulator, a machine over ssh, a phone over adb.

``verify`` and ``bench`` reach the artifact through a ``Device`` (devices/base.py): push the
folder, run a command there, pull a result back, and describe the device for the reports.
A device without this tool's Python runs the artifact through its backend's native runner
(devices/native.py). A new kind of device is one module here and one branch in ``get_device``.
"""

from __future__ import annotations

from exporter.devices.base import Device, DeviceInfo, RunResult
from exporter.errors import UsageError

__all__ = ["Device", "DeviceInfo", "RunResult", "get_device", "DEVICE_KINDS"]

DEVICE_KINDS = ("host", "arm64-emu", "ssh://[user@]host[:port]", "adb:SERIAL")


def get_device(spec: str | Device = "host") -> Device:
    """The device named by ``spec``: "host", "arm64-emu", "ssh://[user@]host[:port]" or
    "adb:SERIAL" (the last three set up by `device setup`); a Device is taken as it is."""
    if isinstance(spec, Device):
        return spec
    if spec == "host":
        from exporter.devices.host import HostDevice

        return HostDevice()
    if spec == "arm64-emu":
        from exporter.devices.arm64_emu import Arm64EmuDevice

        return Arm64EmuDevice()
    if spec.startswith("ssh://"):
        from exporter.devices.ssh import SshDevice

        return SshDevice(spec)
    if spec.startswith("adb:"):
        from exporter.devices.adb import AdbDevice

        return AdbDevice(spec)
    raise UsageError(f"unknown device {spec!r}", hint=f"use one of {', '.join(DEVICE_KINDS)}")
