"""The device interface: what verify and bench need from the machine that runs the artifact."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    name: str  # as reports label it, e.g. "host"
    arch: str  # uname -m: x86_64, aarch64, ...
    cpu_count: int
    emulated: bool = False
    features: tuple[str, ...] = ()  # CPU features the runtime kernels may use (when known)

    @property
    def label(self) -> str:
        emulated = ", emulated" if self.emulated else ""
        return f"{self.name} ({self.arch}, {self.cpu_count} cores{emulated})"


@dataclass(frozen=True, kw_only=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    env: dict[str, str] = field(default_factory=dict)


class Device(ABC):
    @abstractmethod
    def describe(self) -> DeviceInfo: ...

    @abstractmethod
    def push(self, local: Path) -> Path:
        """Make ``local`` (an artifact folder) available on the device; its path there."""

    @abstractmethod
    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> RunResult:
        """Run a command on the device, to completion."""

    @abstractmethod
    def pull(self, remote: Path, local: Path) -> Path:
        """Copy a file the device wrote back to ``local``; returns ``local``."""

    @abstractmethod
    def python(self) -> list[str]:
        """The command that starts this tool's Python (with the exporter package) on the device."""
