"""Running a .pte: ExecuTorch's Python runtime for parity, its C++ LLM runner for throughput."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from exporter.backends.base import RunTiming
from exporter.errors import require
from exporter.runners import ChunkedRunner, quiet_native_stderr

EXTRA = "executorch"


def import_runtime():
    """The ExecuTorch Python runtime plus the kernels our programs call outside XNNPACK."""
    runtime = require("executorch.runtime", EXTRA)
    # Registers llama::custom_sdpa / update_cache and the quantized embedding kernels with
    # the runtime; without them loading fails with "Missing operator".
    require("executorch.extension.llm.custom_ops.custom_ops", EXTRA)
    require("executorch.kernels.quantized", EXTRA)
    return runtime


def device_tokenizer(path: Path):
    """encode/decode with the C++ HF tokenizer that ExecuTorch's LLM runner uses on device."""
    with quiet_native_stderr():  # its static initialisers log on import
        tokenizers = require("pytorch_tokenizers", EXTRA)
    tok = tokenizers.CppHFTokenizer()
    with quiet_native_stderr():  # "I tokenizers:regex.cpp:40] Registering override fallback regex"
        tok.load(str(path))
    fallback = []

    def decode(ids) -> str:
        try:
            return tok.decode_batch(list(ids))
        except UnicodeDecodeError:
            # A cut multi-byte character (the C++ binding cannot return invalid UTF-8):
            # decode with the same tokenizer.json through `tokenizers`, which writes U+FFFD.
            if not fallback:
                from tokenizers import Tokenizer

                fallback.append(Tokenizer.from_file(str(path)))
            return fallback[0].decode(list(ids), skip_special_tokens=False)

    def encode(text: str) -> list[int]:
        with quiet_native_stderr():  # the first encode logs its regex fallback
            return list(tok.encode(text, 0, 0))

    return encode, decode


class LLMRunnerSession:
    """ExecuTorch's TextLLMRunner (C++ prefill/decode loop): the throughput path.

    A Python loop over Method.execute adds a fraction of a millisecond per token, so throughput is measured
    through the runner the app would embed: decode from its own timers (whole ms, fine over
    127 steps), TTFT and prefill with perf_counter around a one-token call."""

    def __init__(self, program: Path, tokenizer: Path, *, threads: int) -> None:
        import_runtime()
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
        from executorch.extension.pybindings.portable_lib import (
            _threadpool_get_thread_count,
            _unsafe_reset_threadpool,
        )

        _unsafe_reset_threadpool(threads)
        self.threads = _threadpool_get_thread_count()
        self._config = GenerationConfig
        self.encode, self.decode = device_tokenizer(tokenizer)  # what the runner tokenizes with
        # Load time: the runner maps the program and tokenizer, then its first call loads the
        # method (XNNPACK weight packing happens here); Python imports are not counted.
        with quiet_native_stderr():  # the runtime's cpuinfo and loader log lines
            t0 = time.perf_counter()
            self.runner = TextLLMRunner(str(program), str(tokenizer))
            self.runner.generate("warm", GenerationConfig(max_new_tokens=1, temperature=0.0, echo=False))
            self.load_ms = (time.perf_counter() - t0) * 1e3

    def run(self, text: str, *, max_new_tokens: int) -> RunTiming:
        stats = {}
        self.runner.reset()
        with quiet_native_stderr():  # redirected outside the timed window
            cpu0, wall0 = time.process_time(), time.perf_counter()
            self.runner.generate(text, self._config(max_new_tokens=max_new_tokens, temperature=0.0, echo=False),
                                 stats_callback=lambda s: stats.setdefault("s", s))
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0
        s = stats["s"]
        # The runner's own timers tick in whole milliseconds: too coarse for a small model's
        # prefill. With max_new_tokens=1 the call is tokenize + prefill + first sample, which is
        # the time to first token; timed here with perf_counter.
        # ExecuTorch 1.5.1 samples the first token from the prefill logits and counts only
        # decode steps in num_generated_tokens.
        decode_ms = max(s.inference_end_ms - s.first_token_ms, 1)
        return RunTiming.of(prompt_tokens=s.num_prompt_tokens, first_token_s=wall, max_new_tokens=max_new_tokens,
                            generated=s.num_generated_tokens, decode_s=decode_ms / 1e3, cpu_s=cpu, wall_s=wall)


class ExecuTorchRunner(ChunkedRunner):
    """Logits-level access to a .pte through executorch.runtime (for parity, not throughput)."""

    def __init__(self, pte: Path, max_prefill_len: int, max_seq_len: int) -> None:
        runtime = import_runtime()
        import torch

        super().__init__("executorch", max_prefill_len=max_prefill_len, max_seq_len=max_seq_len)
        self._torch = torch
        with quiet_native_stderr():  # cpuinfo's "Reading file /sys/devices/..." lines
            self.program = runtime.Runtime.get().load_program(Path(pte))
            self.method = self.program.load_method("forward")

    def _step(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        torch = self._torch
        with quiet_native_stderr():
            out = self.method.execute([
                torch.tensor([list(tokens)], dtype=torch.long), torch.tensor([start_pos], dtype=torch.long),
            ])
        return out[0][0].float().numpy().copy()

    def constant(self, name: str):
        method = self.program.load_method(name)
        return method.execute([])[0]
