"""The float model's task candidates, kept between verify runs.

The float side of the task section is the same for every artifact exported from one
checkpoint (a release matrix verifies nine of them), and on a CPU it costs more than the
artifact's side: the checkpoint runs in float32 through transformers. So its candidates are
stored once per checkpoint and decoding method, under the tool's cache folder
(``RECGPT_EXPORT_CACHE``, default ~/.cache/recgpt-export) in ``task-reference/``, one JSON file
per key. The key holds everything that decides the tokens: the checkpoint's weights digest,
k, max_new_tokens, the stop ids, and the torch and transformers versions; an entry is found
by the digest of the prompt's token ids, so a changed prompt format or eval set is a miss,
never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

FOLDER = "task-reference"


def reference_key(*, weights_sha256: str, k: int, max_new_tokens: int, stop_ids: set[int]) -> str:
    import torch
    import transformers

    parts = dict(weights=weights_sha256, k=k, max_new_tokens=max_new_tokens, stop=sorted(stop_ids),
                 torch=torch.__version__, transformers=transformers.__version__)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _prompt_digest(prompt: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps(list(prompt)).encode()).hexdigest()[:32]


@dataclass
class CachedCandidates:
    """``decode`` (one model's intent/task.CandidateFn) with its answers kept in ``path``: call it as the
    CandidateFn, then ``save()``. ``hits`` / ``misses`` count this run's prompts."""

    decode: Callable[..., list[list[int]]]
    path: Path
    entries: dict[str, list[list[int]]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    @classmethod
    def open(cls, decode: Callable[..., list[list[int]]], cache_dir: Path, key: str) -> CachedCandidates:
        path = Path(cache_dir) / FOLDER / f"{key}.json"
        entries = {}
        if path.is_file():
            try:
                entries = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                entries = {}  # a damaged cache file is recomputed, not trusted
        return cls(decode=decode, path=path, entries=entries)

    def __call__(self, prompt: Sequence[int], **kw) -> list[list[int]]:
        digest = _prompt_digest(prompt)
        if digest in self.entries:
            self.hits += 1
            return [list(c) for c in self.entries[digest]]
        self.misses += 1
        got = self.decode(prompt, **kw)
        self.entries[digest] = got
        return got

    def save(self) -> None:
        if not self.misses:
            return
        from exporter.records import write_text_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.entries, separators=(",", ":")))
