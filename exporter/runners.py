"""Runners: one interface over an eager torch model and every artifact kind.

A runner holds a KV cache. ``prefill(tokens)`` starts a sequence at position 0 and returns
the last token's logits; ``decode(token, pos)`` feeds one token at ``pos``. Logits are
float32 NumPy vectors of vocabulary size, so parity code never touches a framework.

The eager runners are also ``SequenceScorer``s: ``sequence_logits(tokens)`` gives the
logits after every token of a sequence, in one pass from position 0. Teacher-forced scoring
(parity) takes them that way instead of one decode step per token: an fp32 eager decode
step reads every weight for one token, a whole sequence costs a few of them. The artifacts
keep decoding token by token, as the app runs them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from exporter.errors import UsageError


class ContextFullError(UsageError):
    """A prompt plus generation that does not fit the artifact's static KV cache."""


NATIVE_LOGS_ENV = "RECGPT_NATIVE_LOGS"  # "1": the runtimes' C++ logs stay on stderr


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence C++ logging on file descriptor 2 for one call.

    ExecuTorch's eager wrappers of llama::custom_sdpa log "No temp allocator provided" on
    every call, thousands of lines per verify. Python exceptions are unaffected: they are
    raised, not written to fd 2, inside this block. ``--debug`` keeps them
    (RECGPT_NATIVE_LOGS=1, inherited by worker processes)."""
    if os.environ.get(NATIVE_LOGS_ENV) == "1":
        yield
        return
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # captured stderr (pytest, CliRunner)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


class Runner(Protocol):
    name: str
    max_prefill_len: int

    def prefill(self, tokens: Sequence[int]) -> np.ndarray: ...

    def decode(self, token: int, pos: int) -> np.ndarray: ...


class SequenceScorer(ABC):
    """A runner that can score a whole sequence in one pass (declared by inheriting this)."""

    @abstractmethod
    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] after each token, from position 0."""


class ChunkedRunner(ABC):
    """A runner over one static cache of ``max_seq_len`` slots, fed at most ``max_prefill_len``
    tokens per call: longer prefills run in chunks, the cache carrying across them. A
    subclass gives ``_step(tokens, start_pos)``, one call of its program."""

    def __init__(self, name: str, *, max_prefill_len: int, max_seq_len: int) -> None:
        self.name = name
        self.max_prefill_len = max_prefill_len
        self.max_seq_len = max_seq_len

    @abstractmethod
    def _step(self, tokens: Sequence[int], start_pos: int) -> np.ndarray: ...

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        if not tokens:
            raise ValueError("prefill needs at least one token")
        self._check_room(0, len(tokens))
        self._start_sequence()
        return self.extend(tokens, 0)

    def extend(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        """Feed ``tokens`` from ``start_pos`` into the sequence already in the cache (positions
        before it hold its keys, e.g. a cached prompt prefix); the last token's logits."""
        if not tokens:
            raise ValueError("extend needs at least one token")
        self._check_room(start_pos, len(tokens))
        logits = None
        for start in range(0, len(tokens), self.max_prefill_len):
            logits = self._step(tokens[start : start + self.max_prefill_len], start_pos + start)
        return logits

    def _start_sequence(self) -> None:  # noqa: B027 - an optional hook; the default does nothing
        """Before a prefill from position 0: runtimes whose state must be renewed do it here."""

    def decode(self, token: int, pos: int) -> np.ndarray:
        self._check_room(pos, 1)
        return self._step([token], pos)

    def _check_room(self, pos: int, count: int) -> None:
        if pos + count > self.max_seq_len:
            raise ContextFullError(
                f"position {pos} + {count} token(s) exceeds the KV cache of {self.max_seq_len} slots",
                hint="export with a larger kv_cache.max_seq_len (--set kv_cache.max_seq_len=N)",
            )


class PrefixCachedRunner:
    """A runner whose cache keeps a fixed prompt prefix (the instruction and template before
    the behaviour lines): the prefix is prefilled once, and a prompt that starts with it is
    prefilled from the position after it. A static in-place cache needs no copy for this: a
    request writes only positions after the prefix, and attention reads only the positions
    before its own. A prompt that does not start with the prefix is prefilled whole (which
    overwrites the prefix; it is prefilled again when next needed); ``served`` and ``whole``
    count each kind."""

    def __init__(self, runner: ChunkedRunner, prefix: Sequence[int]) -> None:
        self.runner = runner
        self.prefix = tuple(int(t) for t in prefix)
        self.name = f"{runner.name} (cached prefix of {len(self.prefix)} tokens)"
        self.max_prefill_len = runner.max_prefill_len
        self.max_seq_len = runner.max_seq_len
        self.served = self.whole = 0
        self._prefix_in_cache = False

    def starts_with_prefix(self, tokens: Sequence[int]) -> bool:
        n = len(self.prefix)
        return 0 < n < len(tokens) and tuple(tokens[:n]) == self.prefix

    def prefill_prefix(self) -> np.ndarray:
        """Put the prefix in the cache (an app does this once, at start)."""
        logits = self.runner.prefill(list(self.prefix))
        self._prefix_in_cache = True
        return logits

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        if not self.starts_with_prefix(tokens):
            self._prefix_in_cache = False
            self.whole += 1
            return self.runner.prefill(tokens)
        if not self._prefix_in_cache:
            self.prefill_prefix()
        self.served += 1
        return self.runner.extend(tokens[len(self.prefix):], len(self.prefix))

    def decode(self, token: int, pos: int) -> np.ndarray:
        return self.runner.decode(token, pos)


class EagerRunner(ChunkedRunner, SequenceScorer):
    """Our StaticCacheLM in eager torch (float or quantized): the lowering reference."""

    def __init__(self, lm, name: str = "eager") -> None:
        super().__init__(name, max_prefill_len=lm.max_prefill_len, max_seq_len=lm.max_seq_len)
        self.lm = lm

    def _step(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        import torch

        with torch.no_grad(), quiet_native_stderr():
            out = self.lm(torch.tensor([list(tokens)], dtype=torch.long), torch.tensor([start_pos], dtype=torch.long))
        return out[0].float().numpy()

    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] after each token, from position 0 (chunks of
        max_prefill_len, the cache carrying across them, as prefill does)."""
        import torch

        self._check_room(0, len(tokens))
        rows = []
        with torch.no_grad(), quiet_native_stderr():
            for start in range(0, len(tokens), self.max_prefill_len):
                chunk = torch.tensor([list(tokens[start : start + self.max_prefill_len])], dtype=torch.long)
                rows.append(self.lm.all_logits(chunk, torch.tensor([start], dtype=torch.long))[0].float().numpy())
        return np.concatenate(rows)


class PerturbedRunner(EagerRunner):
    """The eager model with its embedding output scaled by (1 + relative) on every call.

    A float model barely moves (about 1e-5 of its logits); one that quantizes its
    activations at run time moves as far as rounding differences between two correct
    implementations move it, which is what the lowering noise floor measures."""

    def __init__(self, lm, relative: float, name: str = "perturbed eager") -> None:
        super().__init__(lm, name=name)
        self.relative = relative

    def _step(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        with self._perturbed():
            return super()._step(tokens, start_pos)

    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        with self._perturbed():
            return super().sequence_logits(tokens)

    @contextlib.contextmanager
    def _perturbed(self):
        handle = self.lm.model.embed_tokens.register_forward_hook(lambda _m, _i, out: out * (1 + self.relative))
        try:
            yield
        finally:
            handle.remove()


class TransformersRunner(SequenceScorer):
    """The trained model exactly as transformers runs it (dynamic cache): the float reference."""

    def __init__(self, hf_model, name: str = "float") -> None:
        self.model = hf_model
        self.name = name
        self.max_prefill_len = 1 << 30
        self._cache = None
        self._pos = 0

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        from transformers import DynamicCache

        self._cache = DynamicCache(config=self.model.config)
        self._pos = 0
        return self._forward(list(tokens))

    def decode(self, token: int, pos: int) -> np.ndarray:
        if pos != self._pos:
            raise ValueError(f"TransformersRunner decodes in order: expected pos {self._pos}, got {pos}")
        return self._forward([token])

    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] after each token, one forward from position 0."""
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([list(tokens)], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()

    def _forward(self, tokens: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(
                input_ids=torch.tensor([tokens], dtype=torch.long),
                cache=self._cache, use_cache=True, logits_to_keep=1,
            )
        self._cache = out.cache
        self._pos += len(tokens)
        return out.logits[0, -1].float().numpy()


def greedy(runner, prompt: list[int], max_new_tokens: int, eos_ids: set[int],
           logits_seen: list[np.ndarray] | None = None) -> list[int]:
    """Greedy decoding through any Runner; stops at an EOS id (not included) or the budget.

    ``logits_seen``: given, each step's logits (the ones its token was chosen from) are
    appended to it: with no EOS honoured, exactly the teacher-forced logits of the tokens
    returned, so parity takes the float model's from here instead of running it again."""
    logits = runner.prefill(prompt)
    out: list[int] = []
    pos = len(prompt)
    for step in range(max_new_tokens):
        if logits_seen is not None:
            logits_seen.append(logits)
        token = int(np.argmax(logits))
        if token in eos_ids:
            break
        out.append(token)
        if step + 1 < max_new_tokens:  # the budget's last token needs no logits after it
            logits = runner.decode(token, pos)
            pos += 1
    return out
