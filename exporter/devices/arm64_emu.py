"""arm64-emu: an ARM64 Linux userland under qemu-user, built from Debian packages and PyPI wheels.

``setup`` needs no hub and no chroot: qemu-aarch64-static runs aarch64 binaries against the
cross toolchain's sysroot (``-L /usr/aarch64-linux-gnu``), and each backend that declares a
native runner gets it cross-compiled against its pinned runtime's ``manylinux_2_28_aarch64``
wheel (the ARM kernels a phone runs: XNNPACK's NEON paths, not the x86 ones). Everything lives
in one folder (default ``~/.cache/recgpt-export/devices/arm64-emu``), built beside it and
renamed into place, so an interrupted setup leaves nothing half-built. Python does not run
there (ExecuTorch's bindings need an aarch64 torch), so verify and bench drive the native
runners from the host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from exporter.devices.base import DeviceInfo
from exporter.devices.host import HostDevice
from exporter.errors import StageError, UsageError

KIND = "arm64-emu"
QEMU = "qemu-aarch64-static"
COMPILER = "aarch64-linux-gnu-g++"
SYSROOT = Path("/usr/aarch64-linux-gnu")
DEBIAN_PACKAGES = ("qemu-user-static", "g++-aarch64-linux-gnu")
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
STATE = "device.json"
# qemu's CPU models: "max" has every feature qemu emulates (SVE2, SME, i8mm: kernels few
# phones can run); cortex-a76 is a 2019-2021 phone big core (dotprod, no i8mm, no SVE).
CPU_MODELS = ("max", "cortex-a76", "cortex-a72", "cortex-a57", "cortex-a53", "neoverse-n1", "a64fx")


def default_root() -> Path:
    from exporter.load import default_cache_dir

    return Path(os.environ.get("RECGPT_DEVICES_DIR", default_cache_dir() / "devices")) / KIND


class Arm64EmuDevice(HostDevice):
    """The host's files and processes, every command run under qemu-aarch64."""

    kind = KIND

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_root()
        state = self.root / STATE
        if not state.is_file():
            raise UsageError(f"device {KIND} is not set up ({self.root} has no {STATE})",
                             hint=f"run `recgpt-export device setup {KIND}` first")
        self.state = json.loads(state.read_text())

    def describe(self) -> DeviceInfo:
        return DeviceInfo(kind=KIND, name=f"{KIND} ({self.cpu})", arch="aarch64", cpu_count=os.cpu_count() or 1,
                          emulated=True)

    @property
    def cpu(self) -> str:
        return self.state.get("cpu", "max")

    def _wrap(self, argv: Sequence[str]) -> list[str]:
        return [QEMU, "-cpu", self.cpu, "-L", str(SYSROOT), *argv]

    def python(self) -> list[str] | None:
        return None

    def native_runner(self, target: str) -> Path | None:
        entry = self.state.get("runners", {}).get(target)
        if entry is None:
            return None
        binary = self.root / entry["binary"]
        return binary if binary.is_file() else None

    def runtime_of(self, target: str) -> str:
        return self.state.get("runners", {}).get(target, {}).get("runtime", "")


def status(root: Path | None = None) -> dict | None:
    """The set-up state (device.json), or None when not set up."""
    state = (Path(root) if root else default_root()) / STATE
    return json.loads(state.read_text()) if state.is_file() else None


def remove(root: Path | None = None) -> bool:
    root = Path(root) if root else default_root()
    if not root.exists():
        return False
    shutil.rmtree(root)
    return True


def _tools(progress: Callable[[str], None]) -> None:
    """qemu and the cross compiler, installed with apt when we may; else one line naming them."""
    missing = [tool for tool in (QEMU, COMPILER) if shutil.which(tool) is None] + \
        ([] if SYSROOT.is_dir() else [str(SYSROOT)])
    if not missing:
        return
    install = ["apt-get", "install", "-y", "-q", *DEBIAN_PACKAGES]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise UsageError(f"device setup {KIND} needs {', '.join(missing)}",
                         hint=f"install the Debian packages {' and '.join(DEBIAN_PACKAGES)} "
                              f"(as root: {' '.join(install)})")
    progress(f"installing {' '.join(DEBIAN_PACKAGES)} with apt-get")
    for command in (["apt-get", "update", "-q"], install):
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UsageError(f"{' '.join(command)} failed: {tail}",
                             hint=f"install {' and '.join(DEBIAN_PACKAGES)} by hand, then run setup again")


def _download_wheel(package: str, version: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--platform", WHEEL_PLATFORM, "--python-version", f"{sys.version_info.major}{sys.version_info.minor}",
               f"{package}=={version}", "-d", str(into)]
    proc = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise StageError(f"pip download of {package}=={version} for {WHEEL_PLATFORM} failed: {tail}",
                         stage="device setup", hint="the package registry must be reachable for setup (once)")
    return wheels[0]


def build_aarch64_runner(spec, version: str, out_dir: Path, downloads: Path,
                         progress: Callable[[str], None]) -> tuple[Path, Path]:
    """A backend's native runner for aarch64 (cross-compiled against the pinned runtime's
    aarch64 wheel, downloaded into ``downloads``) in ``out_dir``; the binary and the wheel."""
    downloads.mkdir(parents=True, exist_ok=True)
    progress(f"downloading {spec.runtime_package}=={version} for {WHEEL_PLATFORM}")
    wheel = _download_wheel(spec.runtime_package, version, downloads)
    progress(f"building the {spec.runtime_package} runner for aarch64")
    return spec.build(wheel, out_dir, compiler=COMPILER), wheel


def setup(root: Path | None = None, *, progress: Callable[[str], None] = lambda _m: None,
          force: bool = False, cpu: str = "max") -> dict:
    """Build the emulator's folder: a native runner per backend that declares one. Idempotent:
    nothing is rebuilt while the pinned runtimes are the ones it was built against; ``cpu``
    (a qemu CPU model, CPU_MODELS) is what later runs emulate."""
    from exporter.artifact import sha256_file
    from exporter.backends import backend_class, known_targets

    if cpu not in CPU_MODELS:
        raise UsageError(f"unknown CPU model {cpu!r}", hint=f"use one of {', '.join(CPU_MODELS)}")
    root = Path(root) if root else default_root()
    wanted = {}
    for target in known_targets():
        spec = backend_class(target).native_runner
        if spec is not None:
            wanted[target] = (spec, metadata.version(spec.runtime_package))
    current = status(root)
    if current and not force and all(
            current.get("runners", {}).get(t, {}).get("runtime") == f"{spec.runtime_package} {version}"
            for t, (spec, version) in wanted.items()):
        if current.get("cpu", "max") != cpu:
            current["cpu"] = cpu
            (root / STATE).write_text(json.dumps(current, indent=2) + "\n")
        progress(f"{KIND} is set up at {root} (runners: {', '.join(current['runners']) or 'none'}; CPU {cpu})")
        return current
    _tools(progress)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{KIND}.partial-", dir=root.parent))
    try:
        runners = {}
        for target, (spec, version) in wanted.items():
            downloads = staging / "downloads"
            binary, wheel = build_aarch64_runner(spec, version, staging / target, downloads, progress)
            probe = subprocess.run([QEMU, "-L", str(SYSROOT), str(binary)], capture_output=True, text=True)
            if "usage" not in probe.stdout:
                raise StageError(f"the {target} runner does not start under {QEMU}: "
                                 f"{(probe.stderr.strip().splitlines() or ['no output'])[-1]}", stage="device setup")
            runners[target] = {"binary": str(binary.relative_to(staging)), "sha256": sha256_file(binary),
                               "runtime": f"{spec.runtime_package} {version}", "wheel": wheel.name,
                               "wheel_sha256": sha256_file(wheel)}
            shutil.rmtree(downloads)
        qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        state = {"kind": KIND, "arch": "aarch64", "cpu": cpu, "qemu": qemu, "sysroot": str(SYSROOT),
                 "runners": runners}
        (staging / STATE).write_text(json.dumps(state, indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    progress(f"{KIND} set up at {root}")
    return state
