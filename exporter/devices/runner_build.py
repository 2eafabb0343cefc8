"""Building a backend's device runner for a device's platform (``Backend.native_runner``).

A compiled runner is built against the pinned runtime's wheel for the device's platform
(``pip download --only-binary=:all: --platform manylinux_2_28_<arch>``): with the host's
compiler when the device is of the host's architecture, else with the aarch64 cross
compiler. A script runner gets the pinned runtime's and companions' wheels for the device's
platform and Python version unpacked beside it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from exporter.errors import StageError, UsageError

CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-g++"}


def wheel_platform(arch: str) -> str:
    return f"manylinux_2_28_{arch}"


def host_python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def download_wheel(package: str, version: str, into: Path, *, arch: str, python_version: str) -> Path:
    import subprocess

    platform = wheel_platform(arch)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--platform", platform, "--python-version", python_version.replace(".", ""),
               f"{package}=={version}", "-d", str(into)]
    proc = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise StageError(f"pip download of {package}=={version} for {platform} (Python {python_version}) "
                         f"failed: {tail}", stage="device setup",
                         hint="the package registry must be reachable for setup (once)")
    return wheels[0]


def build_device_runner(spec, out_dir: Path, downloads: Path, progress: Callable[[str], None], *, arch: str,
                        python_version: str) -> tuple[Path, Path | None]:
    """``spec``'s runner for an ``arch`` device in ``out_dir`` (wheels go to ``downloads``);
    the runner and the runtime wheel it was built against (None: the host's installed runtime)."""
    host = arch == os.uname().machine
    if host and not spec.interpreted:
        progress(f"building the {spec.runtime_package} runner for {arch} (host compiler)")
        return spec.build_for_host(out_dir), None
    compiler = "" if spec.interpreted else CROSS_COMPILERS.get(arch)
    if compiler is None:
        raise UsageError(f"no {spec.runtime_package} runner build for {arch} devices",
                         hint=f"runners are built for {os.uname().machine} and {', '.join(CROSS_COMPILERS)}")
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = []
    for package in spec.packages:
        version = metadata.version(package)
        progress(f"downloading {package}=={version} for {wheel_platform(arch)}")
        wheels.append(download_wheel(package, version, downloads, arch=arch, python_version=python_version))
    progress(f"building the {spec.runtime_package} runner for {arch}")
    return spec.build(wheels, out_dir, compiler=compiler), wheels[0]
