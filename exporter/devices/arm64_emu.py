"""arm64-emu: an ARM64 Linux userland under qemu-user, built from Debian packages and PyPI wheels.

``setup`` needs no hub, no root and no chroot: qemu-aarch64-static runs aarch64 programs
against a Debian arm64 userland unpacked into the device's folder (devices/debian_sysroot.py:
the C and C++ runtimes, a Python, and an ARM /proc/cpuinfo), and each backend that declares
a device runner gets it built against its pinned runtime's ``manylinux_2_28_aarch64`` wheel
(the ARM kernels a phone runs: XNNPACK's NEON paths and ONNX Runtime's ARM MLAS, not the x86
ones). Everything lives in one folder (default ``~/.cache/recgpt-export/devices/arm64-emu``),
built beside it and renamed into place, so an interrupted setup leaves nothing half-built.
This tool's own Python does not run there (ExecuTorch's bindings need an aarch64 torch), so
verify and bench drive the runners from the host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from exporter.devices.base import DeviceInfo
from exporter.devices.host import HostDevice
from exporter.devices.runner_build import CROSS_COMPILERS
from exporter.errors import StageError, UsageError

KIND = "arm64-emu"
QEMU = "qemu-aarch64-static"
COMPILER = CROSS_COMPILERS["aarch64"]
SYSROOT = Path("/usr/aarch64-linux-gnu")  # the cross compiler's (build time only)
USERLAND = "sysroot"  # the device folder's Debian arm64 userland (run time)
DEBIAN_PACKAGES = ("qemu-user-static", "g++-aarch64-linux-gnu")
STATE = "device.json"
# qemu's CPU models: "max" has every feature qemu emulates (SVE2, SME, i8mm: kernels few
# phones can run); cortex-a76 is a 2019-2021 phone big core (dotprod, no i8mm, no SVE).
CPU_MODELS = ("max", "cortex-a76", "cortex-a72", "cortex-a57", "cortex-a53", "neoverse-n1", "a64fx")


def check_cpu(cpu: str) -> None:
    """A qemu CPU model, optionally with feature switches qemu takes (``max,sme=off``: the
    ``max`` model without SME, see docs/device-tests.md)."""
    model, *switches = cpu.split(",")
    if model not in CPU_MODELS:
        raise UsageError(f"unknown CPU model {model!r}", hint=f"use one of {', '.join(CPU_MODELS)}")
    for switch in switches:
        name, _, value = switch.partition("=")
        if not name.replace("-", "").isalnum() or value not in ("on", "off"):
            raise UsageError(f"CPU feature switch {switch!r} is not NAME=on or NAME=off",
                             hint="for example --cpu max,sme=off")


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
        if "userland" not in self.state:  # set up by a version that ran on the cross compiler's sysroot
            raise UsageError(f"device {KIND} at {self.root} was set up by an older recgpt-export",
                             hint=f"run `recgpt-export device setup {KIND}` again (seconds to a minute)")

    def describe(self) -> DeviceInfo:
        return DeviceInfo(kind=KIND, name=f"{KIND} ({self.cpu})", arch="aarch64", cpu_count=os.cpu_count() or 1,
                          emulated=True, features=tuple(self.state.get("cpu_features", ())))

    @property
    def cpu(self) -> str:
        return self.state.get("cpu", "max")

    def _wrap(self, argv: Sequence[str]) -> list[str]:
        return emulated(self.root / USERLAND, self.cpu, argv)

    def python(self) -> list[str] | None:
        return None

    def interpreter(self) -> list[str] | None:
        return [userland_python(self.root, self.state["userland"])]

    def native_runner(self, target: str) -> Path | None:
        entry = self.state.get("runners", {}).get(target)
        if entry is None:
            return None
        binary = self.root / entry["binary"]
        return binary if binary.is_file() else None

    def runtime_of(self, target: str) -> str:
        return self.state.get("runners", {}).get(target, {}).get("runtime", "")


def userland_python(root: Path, userland: dict) -> str:
    """The userland's Python (device.json's ``userland``) in the device folder ``root``."""
    return str(root / USERLAND) + userland["python"]


def emulated(userland: Path, cpu: str, argv: Sequence[str]) -> list[str]:
    """The host command that runs the aarch64 ``argv`` on CPU model ``cpu`` over ``userland``."""
    return [QEMU, "-cpu", cpu, "-L", str(userland), *argv]


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


HWCAP_PROBE = ("import ctypes; f = ctypes.CDLL(None).getauxval; f.restype = ctypes.c_ulong; "
               "f.argtypes = [ctypes.c_ulong]; print(f(16), f(26))")


def cpu_features(root: Path, userland: dict, cpu: str) -> tuple[str, ...]:
    """The hwcaps qemu's CPU model ``cpu`` reports to programs (getauxval), by name."""
    from exporter.devices.native import hardware_features

    proc = subprocess.run(emulated(root / USERLAND, cpu, [userland_python(root, userland), "-c", HWCAP_PROBE]),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageError(f"the {KIND} userland's Python does not start under {QEMU}: "
                         f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}", stage="device setup")
    hwcap, hwcap2 = (int(v) for v in proc.stdout.split())
    return hardware_features("aarch64", hwcap, hwcap2)


def _describe_cpu(root: Path, state: dict, cpu: str) -> None:
    """Point the userland's /proc/cpuinfo (and the state) at CPU model ``cpu``."""
    from exporter.devices.debian_sysroot import write_cpuinfo

    features = cpu_features(root, state["userland"], cpu)
    write_cpuinfo(root / USERLAND, cpu, os.cpu_count() or 1, features=features)
    state["cpu"], state["cpu_features"] = cpu, list(features)


def setup(root: Path | None = None, *, progress: Callable[[str], None] = lambda _m: None,
          force: bool = False, cpu: str = "max") -> dict:
    """Build the emulator's folder: a Debian arm64 userland and a runner per backend that
    declares one. Idempotent: nothing is rebuilt while the pinned runtimes are the ones it was
    built against; ``cpu`` (a qemu CPU model, CPU_MODELS) is what later runs emulate."""
    from exporter.artifact import sha256_file
    from exporter.backends import backend_class, known_targets
    from exporter.devices import debian_sysroot
    from exporter.devices.runner_build import build_device_runner

    check_cpu(cpu)
    root = Path(root) if root else default_root()
    wanted = {t: spec for t in known_targets() if (spec := backend_class(t).native_runner) is not None}

    def runtime(spec) -> str:
        return " ".join(f"{package} {metadata.version(package)}" for package in spec.packages)

    current = status(root)
    if current and not force and "userland" in current and all(
            current.get("runners", {}).get(t, {}).get("runtime") == runtime(spec) for t, spec in wanted.items()):
        if current.get("cpu") != cpu:
            _describe_cpu(root, current, cpu)
            (root / STATE).write_text(json.dumps(current, indent=2) + "\n")
        progress(f"{KIND} is set up at {root} (runners: {', '.join(current['runners']) or 'none'}; CPU {cpu})")
        return current
    _tools(progress)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{KIND}.partial-", dir=root.parent))
    try:
        userland = debian_sysroot.build(staging / USERLAND, cpu=cpu, cpu_count=os.cpu_count() or 1,
                                        progress=progress)
        qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        state = {"kind": KIND, "arch": "aarch64", "qemu": qemu, "userland": userland, "runners": {}}
        _describe_cpu(staging, state, cpu)
        for target, spec in wanted.items():
            downloads = staging / "downloads"
            binary, wheel = build_device_runner(spec, staging / target, downloads, progress, arch="aarch64",
                                                python_version=userland["python_version"])
            launcher = [userland_python(staging, userland)] if spec.interpreted else []
            probe = subprocess.run(emulated(staging / USERLAND, cpu, [*launcher, str(binary)]),
                                   capture_output=True, text=True)
            if "usage" not in probe.stdout:
                raise StageError(f"the {target} runner does not start under {QEMU}: "
                                 f"{(probe.stderr.strip().splitlines() or ['no output'])[-1]}", stage="device setup")
            state["runners"][target] = {"binary": str(binary.relative_to(staging)), "sha256": sha256_file(binary),
                                        "runtime": runtime(spec), "wheel": wheel.name,
                                        "wheel_sha256": sha256_file(wheel)}
            shutil.rmtree(downloads)
        (staging / STATE).write_text(json.dumps(state, indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    progress(f"{KIND} set up at {root}")
    return state
