"""Where an artifact is checked: the host now; emulators, ssh and adb devices next.

``verify`` and ``bench`` reach the artifact through a ``Device`` (devices/base.py): push the
folder, run a command there, pull a result back, and describe the device for the reports.
A new kind of device is one module here and one line in ``get_device``.
"""

from __future__ import annotations

from exporter.devices.base import Device, DeviceInfo, RunResult
from exporter.errors import UsageError

__all__ = ["Device", "DeviceInfo", "RunResult", "get_device"]


def get_device(spec: str = "host") -> Device:
    """The device named by ``spec`` ("host")."""
    if spec == "host":
        from exporter.devices.host import HostDevice

        return HostDevice()
    raise UsageError(f"unknown device {spec!r}", hint="this version checks artifacts on the host only: --device host")
