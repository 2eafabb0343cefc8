"""The host as a device: files stay where they are, commands run as subprocesses."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from exporter.devices.base import Device, DeviceInfo, RunResult

# x86 features the CPU kernels dispatch on (XNNPACK, MLAS), as /proc/cpuinfo names them.
X86_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme", "fphp", "asimdhp")


def kernel_features(cpuinfo: str) -> tuple[str, ...]:
    """The kernel-relevant CPU flags in a /proc/cpuinfo text (x86 "flags", ARM "Features")."""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return tuple(f for f in (*X86_FEATURES, *ARM_FEATURES) if f in flags)


def cpu_features() -> tuple[str, ...]:
    """This machine's kernel-relevant CPU flags (empty where /proc/cpuinfo is not readable)."""
    try:
        return kernel_features(Path("/proc/cpuinfo").read_text())
    except OSError:
        return ()


class HostDevice(Device):
    """Also the base of devices that share the host's files and run local processes (arm64-emu)."""

    kind = "host"

    def __init__(self, runners: Path | None = None) -> None:
        self._runners = runners  # a folder of native runners built for the host (tests, farm checks)

    def describe(self) -> DeviceInfo:
        return DeviceInfo(kind=self.kind, name="host", arch=platform.machine() or os.uname().machine,
                          cpu_count=os.cpu_count() or 1, features=cpu_features())

    def push(self, local: Path) -> Path:
        return Path(local).resolve()

    def _wrap(self, argv: Sequence[str]) -> list[str]:
        """The local command line that runs ``argv`` on this device."""
        return list(argv)

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> RunResult:
        proc = subprocess.run(self._wrap(argv), capture_output=True, text=True, errors="replace", env=env)
        return RunResult(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)

    def spawn(self, argv: Sequence[str], *, stderr: IO[bytes]) -> subprocess.Popen:
        return subprocess.Popen(self._wrap(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)

    def pull(self, remote: Path, local: Path) -> Path:
        if Path(remote).resolve() != Path(local).resolve():
            shutil.copyfile(remote, local)
        return Path(local)

    def python(self) -> list[str] | None:
        return [sys.executable]

    def interpreter(self) -> list[str] | None:
        return [sys.executable]

    def native_runner(self, target: str) -> Path | None:
        if self._runners is None:
            return None
        from exporter.backends import backend_class

        spec = backend_class(target).native_runner
        binary = self._runners / target / spec.name if spec else None
        return binary if binary and binary.is_file() else None
