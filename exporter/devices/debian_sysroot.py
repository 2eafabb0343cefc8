"""An aarch64 Debian userland in a folder, from Debian's packages, without root or a chroot.

apt runs with a private state (its own lists, cache and an empty dpkg status, architecture
arm64) over the host's configured sources, so nothing of the host's apt or dpkg changes and
no root is needed; the packages are unpacked with ``dpkg-deb -x``, not installed (no
maintainer scripts run). ``qemu-aarch64 -L FOLDER`` then resolves every absolute path a
program opens in that folder first, which is also how the emulator gets an ARM
``/proc/cpuinfo``: qemu-user 7.2 passes the host's x86 one through, and the cpuinfo library
inside XNNPACK and ONNX Runtime (MLAS) misreads it (onnxruntime segfaults on import).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from exporter.errors import StageError, UsageError

ARCH = "arm64"
# A Python (for script runners), and the C and C++ runtimes every runner links.
PACKAGES = ("python3-minimal", "libpython3-stdlib", "libstdc++6", "libgcc-s1", "libc6")

# What the fake /proc/cpuinfo says per qemu CPU model: MIDR implementer, variant, part,
# revision (the Arm TRMs). qemu's "max" has no silicon; qemu gives it implementer 0, part 'Q'
# so that no guest takes it for a real core. cpuinfo reads ISA features from getauxval (the
# emulated CPU's), /proc/cpuinfo only for the core's identity (microarchitecture-tuned kernels).
MIDR = {
    "max": (0x00, 0x0, 0x051, 0), "cortex-a57": (0x41, 0x1, 0xD07, 1), "cortex-a53": (0x41, 0x0, 0xD03, 4),
    "cortex-a72": (0x41, 0x0, 0xD08, 3), "cortex-a76": (0x41, 0x4, 0xD0B, 1), "neoverse-n1": (0x41, 0x4, 0xD0C, 1),
    "a64fx": (0x46, 0x1, 0x001, 0),
}


def _apt(state: Path) -> list[str]:
    return ["-o", f"APT::Architecture={ARCH}", "-o", f"APT::Architectures={ARCH}",
            "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::State::status={state / 'status'}",
            "-o", f"Dir::Cache={state / 'cache'}", "-o", "Debug::NoLocking=1", "-q"]


def _checked(command: list[str], what: str, *, cwd: Path | None = None) -> str:
    proc = subprocess.run(command, capture_output=True, text=True, errors="replace", cwd=cwd)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise StageError(f"{what} failed: {tail}", stage="device setup",
                         hint="the Debian package registry must be reachable for setup (once)")
    return proc.stdout


def build(into: Path, *, cpu: str, cpu_count: int, progress: Callable[[str], None] = lambda _m: None) -> dict:
    """Unpack PACKAGES and their dependencies for arm64 into ``into`` (a new folder) and write
    its /proc/cpuinfo for ``cpu``; what it holds (Python version, package count)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise UsageError("device setup needs apt-get and dpkg-deb (a Debian or Ubuntu host)",
                         hint="run it on a Debian-family machine, or use --device ssh:// to a real ARM machine")
    state = into.parent / f".{into.name}.apt"
    for folder in (state / "lists" / "partial", state / "cache" / "archives" / "partial", state / "debs"):
        folder.mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    try:
        progress(f"reading Debian's {ARCH} package lists")
        _checked(["apt-get", *_apt(state), "update"], "apt-get update (arm64 lists)")
        depends = _checked(["apt-cache", *_apt(state), "depends", "--recurse", "--no-recommends", "--no-suggests",
                            "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *PACKAGES],
                           "apt-cache depends")
        names = sorted({line.strip() for line in depends.splitlines() if line[:1].isalnum()})
        progress(f"downloading {len(names)} Debian {ARCH} packages")
        _checked(["apt-get", *_apt(state), "download", *names], "apt-get download", cwd=state / "debs")
        debs = sorted((state / "debs").glob("*.deb"))
        if not debs:
            raise StageError("apt-get download fetched no package", stage="device setup",
                             hint="the Debian package registry must be reachable for setup (once)")
        into.mkdir(parents=True)
        for deb in debs:
            _checked(["dpkg-deb", "-x", str(deb), str(into)], f"unpacking {deb.name}")
    finally:
        shutil.rmtree(state, ignore_errors=True)
    pythons = sorted(p.name for p in (into / "usr/bin").glob("python3.*") if p.name[len("python3."):].isdigit())
    if not pythons:
        raise StageError(f"the {ARCH} userland has no python3.X in usr/bin", stage="device setup")
    write_cpuinfo(into, cpu, cpu_count, features=("fp", "asimd"))
    return {"packages": len(debs), "python": f"/usr/bin/{pythons[-1]}",
            "python_version": pythons[-1][len("python"):]}


def write_cpuinfo(into: Path, cpu: str, cpu_count: int, *, features: tuple[str, ...]) -> None:
    """/proc/cpuinfo as an arm64 Linux kernel writes it, for the qemu CPU model ``cpu`` with
    ``features`` (the hwcaps the emulated CPU reports)."""
    implementer, variant, part, revision = MIDR[cpu.split(",")[0]]  # a model, then its feature switches
    core = ("processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: " + " ".join(features) + "\n"
            f"CPU implementer\t: {implementer:#04x}\nCPU architecture: 8\nCPU variant\t: {variant:#x}\n"
            f"CPU part\t: {part:#05x}\nCPU revision\t: {revision}\n\n")
    (into / "proc").mkdir(exist_ok=True)
    (into / "proc" / "cpuinfo").write_text("".join(core.format(i=i) for i in range(cpu_count)))
