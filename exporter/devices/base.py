"""The device interface: what verify and bench need from the machine that runs the artifact."""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    """What parity.json and bench.json say of the device (``device_facts``)."""

    kind: str  # "host", "arm64-emu", ...
    name: str  # as reports label it
    arch: str  # uname -m: x86_64, aarch64, ...
    cpu_count: int
    emulated: bool = False
    features: tuple[str, ...] = ()  # CPU features the runtime kernels may use (when known)
    runner: str = ""  # the native runner that ran the artifact, with its sha256 ("" in-process)
    runtime: str = ""  # the runtime version on the device, when it is not the host's

    @property
    def label(self) -> str:
        emulated = ", emulated" if self.emulated else ""
        return f"{self.name} ({self.arch}, {self.cpu_count} cores{emulated})"


@dataclass(frozen=True, kw_only=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str


class Device(ABC):
    kind: str

    @property
    def spec(self) -> str:
        """How --device names it."""
        return self.kind

    @abstractmethod
    def describe(self) -> DeviceInfo: ...

    @abstractmethod
    def push(self, local: Path) -> Path:
        """Make ``local`` (an artifact folder) available on the device; its path there."""

    @abstractmethod
    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> RunResult:
        """Run a command on the device, to completion."""

    @abstractmethod
    def spawn(self, argv: Sequence[str], *, stderr: IO[bytes]) -> subprocess.Popen:
        """Start a command on the device with binary pipes to its stdin and stdout (the native
        runners' protocol) and its stderr written to ``stderr`` (a file: a pipe nobody reads
        would fill and stall a chatty runtime)."""

    @abstractmethod
    def pull(self, remote: Path, local: Path) -> Path:
        """Copy a file the device wrote back to ``local``; returns ``local``."""

    @abstractmethod
    def python(self) -> list[str] | None:
        """The command that starts this tool's Python on the device, or None: the device runs
        artifacts through the backends' native runners only."""

    @abstractmethod
    def interpreter(self) -> list[str] | None:
        """A bare Python 3 on the device that runs script runners (``NativeRunnerSpec.interpreted``:
        they bring their own packages beside them), or None."""

    def file_sha256(self, path: Path) -> str:
        """sha256 of a file on the device (the runner binary, for the reports)."""
        from exporter.artifact import sha256_file

        return sha256_file(path)

    def cleanup(self) -> None:  # noqa: B027 - an optional hook: devices whose push() copies remove it here
        """Remove what push() put on the device."""

    def runtime_of(self, target: str) -> str:
        """The runtime version that target's native runner was built against, when not the host's."""
        return ""

    @abstractmethod
    def native_runner(self, target: str) -> Path | None:
        """The device's build of that target's native runner (``Backend.native_runner``), if set up."""
