"""Lay out the ONNX Runtime device runner: ort_runner.py with the runtime's wheels beside it.

The runner is a Python script (ort_runner.py says why), so "building" it for a device is
unpacking the pinned onnxruntime and numpy wheels of the device's platform into
``site-packages/`` beside a copy of the script: one folder holds all the device runs, and
the device needs only a bare Python of the wheels' version (``Device.interpreter``).
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

SOURCE = Path(__file__).with_name("ort_runner.py")
RUNNER = SOURCE.name


def build_from_wheels(wheels: Sequence[Path], out_dir: Path, *, compiler: str = "") -> Path:
    """The runner for the wheels' platform; ``compiler`` is unused (nothing is compiled)."""
    site = out_dir / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    for library in site.rglob("*.so*"):  # zip extraction drops the execute bits shared libraries want
        library.chmod(0o755)
    return Path(shutil.copy(SOURCE, out_dir / RUNNER))


def build_for_host(out_dir: Path, *, compiler: str = "") -> Path:
    """The runner for this machine: the script alone, over the installed onnxruntime."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(SOURCE, out_dir / RUNNER))
