"""A backend's native runner on a device, as a Runner (parity) and a bench session (timing).

The runner binary speaks one line protocol on its stdin and stdout (see
exporter/backends/executorch/native/et_runner.cpp): the same on the host, under qemu, over
ssh and through adb. Logits come back as raw little-endian float32.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from exporter.backends.base import RunTiming
from exporter.devices.base import Device, DeviceInfo
from exporter.errors import StageError
from exporter.runners import ChunkedRunner

# aarch64 getauxval bits (linux/arch/arm64/include/uapi/asm/hwcap.h) the kernels dispatch on.
ARM_HWCAP = {"fp": 0, "asimd": 1, "fphp": 9, "asimdhp": 10, "asimdrdm": 12, "asimddp": 20, "sve": 22,
             "asimdfhm": 23}
ARM_HWCAP2 = {"sve2": 1, "i8mm": 13, "bf16": 14, "sme": 23}


class NativeRunner(ChunkedRunner):
    """Logits through the device's native runner process (kept alive for a whole verify)."""

    def __init__(self, device: Device, binary: Path, program: Path, *, max_prefill_len: int, max_seq_len: int,
                 threads: int, name: str, launcher: Sequence[str] = ()) -> None:
        super().__init__(name, max_prefill_len=max_prefill_len, max_seq_len=max_seq_len)
        self.binary = binary
        self.binary_sha256 = device.file_sha256(binary)
        t0 = time.perf_counter()
        self._stderr = tempfile.TemporaryFile()
        self._process = device.spawn([*launcher, str(binary), str(program), str(threads)], stderr=self._stderr)
        ready = self._header("READY").split()
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.vocab, self.threads = int(ready[1]), int(ready[2])
        self.features = hardware_features(device.describe().arch, int(ready[3]), int(ready[4]))

    def _header(self, expected: str) -> str:
        line = self._process.stdout.readline().decode("utf-8", errors="replace").strip()
        if line.startswith(expected):
            return line
        if not line:  # the process ended: its stderr says why
            self._process.wait(timeout=30)
            self._stderr.seek(0)
            tail = self._stderr.read().decode("utf-8", errors="replace").strip().splitlines()
            errors = [t for t in tail if t.startswith("E ")] or tail or ["no output"]
            raise StageError(f"the device runner {self.binary.name} stopped (exit {self._process.returncode}): "
                             f"{errors[-1]}", stage="device run")
        raise StageError(f"the device runner {self.binary.name} answered: {line}", stage="device run")

    def _send(self, line: str) -> None:
        try:
            self._process.stdin.write(line.encode() + b"\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            self._header("(the process is gone)")

    def _step(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        self._send(f"STEP {start_pos} {len(tokens)} " + " ".join(str(int(t)) for t in tokens))
        self._header("LOGITS")
        data = self._process.stdout.read(4 * self.vocab)
        if len(data) != 4 * self.vocab:
            self._header("LOGITS")  # short read: the process died mid-answer
        return np.frombuffer(data, dtype="<f4").astype(np.float32)

    def greedy_timed(self, tokens: Sequence[int], max_new_tokens: int) -> tuple[float, float, int]:
        """Prefill + greedy decode timed on the device: (first token s, decode s, decode steps)."""
        self._send(f"GREEDY {max_new_tokens} {len(tokens)} " + " ".join(str(int(t)) for t in tokens))
        fields = self._header("GREEDY").split()
        return int(fields[1]) / 1e6, int(fields[2]) / 1e6, int(fields[3])

    def peak_rss_mb(self) -> float:
        """The runner process's peak resident memory (under emulation: the emulator's)."""
        try:
            status = Path(f"/proc/{self._process.pid}/status").read_text()
        except OSError:
            return 0.0
        line = next((ln for ln in status.splitlines() if ln.startswith("VmHWM:")), "VmHWM: 0 kB")
        return int(line.split()[1]) / 1e3

    def cpu_s(self) -> float:
        """CPU seconds the runner process has used (user + system)."""
        import os

        try:
            fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._send("QUIT")
                self._process.wait(timeout=30)
            except (StageError, OSError):
                self._process.kill()
        for stream in (self._process.stdin, self._process.stdout, self._stderr):
            stream.close()


def hardware_features(arch: str, hwcap: int, hwcap2: int) -> tuple[str, ...]:
    if arch != "aarch64":
        from exporter.devices.host import cpu_features

        return cpu_features()
    return tuple([name for name, bit in ARM_HWCAP.items() if hwcap >> bit & 1]
                 + [name for name, bit in ARM_HWCAP2.items() if hwcap2 >> bit & 1])


class NativeBenchSession:
    """bench.py's session over a native runner: the device times prefill and decode itself;
    text is tokenized on the host with the shipped tokenizer (not timed)."""

    def __init__(self, runner: NativeRunner, encode, decode) -> None:
        self.runner, self.encode, self.decode = runner, encode, decode
        self.threads, self.load_ms = runner.threads, runner.load_ms

    def run(self, text: str, *, max_new_tokens: int) -> RunTiming:
        ids = self.encode(text)
        cpu0, wall0 = self.runner.cpu_s(), time.perf_counter()
        first, decode, steps = self.runner.greedy_timed(ids, max_new_tokens)
        return RunTiming.of(prompt_tokens=len(ids), first_token_s=first, max_new_tokens=max_new_tokens,
                            generated=steps, decode_s=decode, cpu_s=self.runner.cpu_s() - cpu0,
                            wall_s=time.perf_counter() - wall0)


def open_native_runner(device: Device, backend, artifact, *, threads: int) -> tuple[NativeRunner, DeviceInfo]:
    """Start ``backend``'s native runner on ``device`` over the artifact's program; the runner
    and the device's facts (runner sha256, runtime version there)."""
    from dataclasses import replace

    from exporter.errors import UnsupportedError, UsageError

    spec = backend.native_runner
    info = device.describe()
    if spec is None:
        raise UnsupportedError(f"the {backend.name} target has no native runner for {info.name} yet",
                               hint="verify and bench it on the host (--device host)")
    launcher = device.interpreter() if spec.interpreted else []
    if launcher is None:
        raise UnsupportedError(f"the {backend.name} runner is a Python script and {info.name} has no Python",
                               hint="check this target on arm64-emu or an ssh:// device with python3")
    binary = device.native_runner(backend.name)
    if binary is None:
        raise UsageError(f"{info.name} has no {backend.name} runner",
                         hint=f"run `recgpt-export device setup {device.spec}`")
    folder = device.push(artifact.path)
    model = artifact.manifest.model
    runner = NativeRunner(device, binary, folder / artifact.manifest.roles["program"], launcher=launcher,
                          max_prefill_len=model.max_prefill_len, max_seq_len=model.max_seq_len, threads=threads,
                          name=f"{backend.name} native runner on {info.name}")
    runtime = device.runtime_of(backend.name) or backend.runtime_name()
    return runner, replace(info, features=runner.features, runner=f"{binary.name} sha256:{runner.binary_sha256}",
                           runtime=runtime)
