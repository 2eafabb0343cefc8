"""Build the ExecuTorch device runner (et_runner.cpp) against an executorch wheel's libraries.

The wheel for the device's platform (``pip download --only-binary=:all: --platform ...`` of
the pinned executorch) ships ``lib/libexecutorch*.so`` and the runtime headers; the runner
is compiled against them and placed beside a copy of those libraries (rpath ``$ORIGIN/lib``),
so a folder holds everything the device runs. Two gaps of the wheel are filled here: torch's
generated ``torch/headeronly/macros/cmake_macros.h`` (taken from the host's torch, the same
release line) and the runner's own ``llama::`` kernels (et_runner.cpp says why).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from exporter.errors import StageError

SOURCE = Path(__file__).with_name("et_runner.cpp")
RUNNER = "et_runner"
# Kernel and backend libraries register themselves when loaded: link them even though no
# symbol of theirs is named (--no-as-needed).
LIBRARIES = ("executorch_kernels_optimized", "executorch_kernels_quantized", "executorch_backend_xnnpack",
             "executorch_threadpool", "executorch")


def unpack_wheel(wheel: Path, into: Path) -> Path:
    """Extract the runtime's ``lib/`` and ``include/`` from an executorch wheel; their root."""
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith(("executorch/lib/", "executorch/include/")):
                archive.extract(name, into)
    return into / "executorch"


def host_torch_macros() -> Path:
    """The include root holding torch's generated cmake_macros.h (the host torch's)."""
    import torch

    root = Path(torch.__file__).parent / "include"
    if not (root / "torch/headeronly/macros/cmake_macros.h").is_file():
        raise StageError("torch's include/torch/headeronly/macros/cmake_macros.h is missing", stage="device setup")
    return root


def build_runner(executorch_root: Path, out_dir: Path, *, compiler: str) -> Path:
    """Compile et_runner with ``compiler`` against ``executorch_root`` (lib/, include/) into
    ``out_dir``, with the libraries it loads copied to ``out_dir/lib``; returns the binary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    macros = out_dir / "build-include" / "torch/headeronly/macros"
    macros.mkdir(parents=True, exist_ok=True)
    shutil.copy(host_torch_macros() / "torch/headeronly/macros/cmake_macros.h", macros)
    include = executorch_root / "include"
    binary = out_dir / RUNNER
    command = [compiler, "-std=c++17", "-O2", f"-I{include}",
               f"-I{include}/executorch/runtime/core/portable_type/c10", f"-I{out_dir / 'build-include'}",
               str(SOURCE), "-o", str(binary), f"-L{executorch_root / 'lib'}", "-Wl,--no-as-needed",
               *(f"-l{lib}" for lib in LIBRARIES), "-Wl,--as-needed", "-Wl,-rpath,$ORIGIN/lib"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[-300:])
        raise StageError(f"building the ExecuTorch runner failed: {first}", stage="device setup",
                         hint="rerun with --debug for the compiler's whole output")
    shutil.rmtree(out_dir / "build-include")
    libs = out_dir / "lib"
    libs.mkdir(exist_ok=True)
    for name in LIBRARIES:
        shutil.copy(executorch_root / "lib" / f"lib{name}.so", libs / f"lib{name}.so")
    return binary


def build_from_wheels(wheels: Sequence[Path], out_dir: Path, *, compiler: str) -> Path:
    """The runner for the executorch wheel's platform (a device), built with a cross ``compiler``."""
    (wheel,) = wheels
    with tempfile.TemporaryDirectory(prefix="recgpt-et-wheel-") as scratch:
        return build_runner(unpack_wheel(wheel, Path(scratch)), out_dir, compiler=compiler)


def build_for_host(out_dir: Path, *, compiler: str = "g++") -> Path:
    """The runner for this machine, against the installed executorch package."""
    import importlib.util

    spec = importlib.util.find_spec("executorch")  # a namespace package: no __file__
    if spec is None or not spec.submodule_search_locations:
        raise StageError("executorch is not installed", stage="device setup",
                         hint="pip install 'recgpt-export[executorch]'")
    return build_runner(Path(list(spec.submodule_search_locations)[0]), out_dir, compiler=compiler)
