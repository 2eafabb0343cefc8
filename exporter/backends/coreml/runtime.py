"""Running a Core ML package: our NumPy interpreter on Linux, Core ML itself on macOS 15+."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from exporter.backends.base import RunTiming
from exporter.backends.coreml.options import COMPUTE_UNITS
from exporter.errors import require
from exporter.runners import ChunkedRunner

EXTRA = "coreml"
# Set to "interpreter" to use the NumPy interpreter even on macOS (e.g. to compare the two).
EXECUTOR_ENV = "RECGPT_COREML_EXECUTOR"


def native_predict_available() -> bool:
    """coremltools' MLModel.predict with states needs macOS 15+ and the compiled coremltools library."""
    if os.environ.get(EXECUTOR_ENV) == "interpreter" or sys.platform != "darwin":
        return False
    try:
        major = int(platform.mac_ver()[0].split(".")[0])
    except ValueError:
        return False
    return major >= 15


def coremltools_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coremltools")
    except PackageNotFoundError:
        return "not installed"


class InterpreterRunner(ChunkedRunner):
    """The .mlpackage run by our NumPy interpreter (Linux, or anywhere)."""

    def __init__(self, package: Path, max_prefill_len: int, max_seq_len: int) -> None:
        from exporter.backends.coreml.interp import CoreMLProgram

        super().__init__("coreml (interpreter)", max_prefill_len=max_prefill_len, max_seq_len=max_seq_len)
        self.program = CoreMLProgram(package)
        self.state = self.program.new_state()

    def _start_sequence(self) -> None:
        self.state = self.program.new_state()

    def _step(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        out = self.program.predict({"tokens": np.array([list(tokens)], dtype=np.int32),
                                    "input_pos": np.array([start_pos], dtype=np.int32)}, self.state)
        return out["logits"][0].astype(np.float32)


class CoreMLPredictRunner(ChunkedRunner):  # pragma: no cover - needs macOS 15
    """The .mlpackage run by Core ML itself through coremltools (macOS 15+)."""

    def __init__(self, package: Path, max_prefill_len: int, max_seq_len: int, *, compute_units: str) -> None:
        ct = require("coremltools", EXTRA)
        super().__init__("coreml (MLModel.predict)", max_prefill_len=max_prefill_len, max_seq_len=max_seq_len)
        self.model = ct.models.MLModel(str(package),
                                       compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units]))
        self.state = self.model.make_state()

    def _start_sequence(self) -> None:
        self.state = self.model.make_state()

    def _step(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        out = self.model.predict({"tokens": np.array([list(tokens)], dtype=np.int32),
                                  "input_pos": np.array([start_pos], dtype=np.int32)}, state=self.state)
        return np.asarray(out["logits"], dtype=np.float32)[0]


class InterpreterSession:
    """bench.py's timed loop over a runner (interpreter timing on Linux: it measures our NumPy
    interpreter, not Core ML on a device)."""

    def __init__(self, backend, artifact, *, threads: int) -> None:
        # The interpreter runs NumPy's BLAS on one thread whatever bench.threads says (see
        # interp/executor.py); bench.json reports the thread count that ran.
        self.threads = 1
        t0 = time.perf_counter()
        self.runner = backend.load_runner(artifact)
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.encode, self.decode = backend.shipped_tokenizer(artifact)
        self.eos = set(artifact.manifest.model.eos_ids)

    def run(self, text: str, *, max_new_tokens: int) -> RunTiming:
        ids = self.encode(text)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        logits = self.runner.prefill(ids)
        prefill_wall = time.perf_counter() - wall0
        generated, pos = 0, len(ids)
        t_decode = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            token = int(np.argmax(logits))
            if token in self.eos or pos >= self.runner.max_seq_len:
                break
            logits = self.runner.decode(token, pos)
            pos += 1
            generated += 1
        decode_wall = time.perf_counter() - t_decode
        return RunTiming.of(prompt_tokens=len(ids), first_token_s=prefill_wall, max_new_tokens=max_new_tokens,
                            generated=generated, decode_s=decode_wall, cpu_s=time.process_time() - cpu0,
                            wall_s=time.perf_counter() - wall0)
