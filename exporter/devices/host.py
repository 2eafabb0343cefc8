"""The host as a device: files stay where they are, commands run as subprocesses."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from exporter.devices.base import Device, DeviceInfo, RunResult


class HostDevice(Device):
    def describe(self) -> DeviceInfo:
        return DeviceInfo(name="host", arch=platform.machine() or os.uname().machine, cpu_count=os.cpu_count() or 1)

    def push(self, local: Path) -> Path:
        return Path(local).resolve()

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> RunResult:
        proc = subprocess.run(list(argv), capture_output=True, text=True, errors="replace", env=env)
        return RunResult(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)

    def pull(self, remote: Path, local: Path) -> Path:
        if Path(remote).resolve() != Path(local).resolve():
            shutil.copyfile(remote, local)
        return Path(local)

    def python(self) -> list[str]:
        return [sys.executable]
