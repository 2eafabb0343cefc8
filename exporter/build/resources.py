"""What one export needs in memory, and how many fit beside each other (`build --jobs`).

Peak resident memory of `recgpt-export export`, measured with /usr/bin/time -v (docs/ci.md
has the table): it grows with the parameter count, and the end-to-end tuning
(``[quant.tuning]``) keeps activations and gradients of the whole model. The estimate is a
line through two measured sizes per kind (SmolLM2-135M here, and the 630M Qwen2-shaped model of issue 20), with
a margin, so `--jobs` is refused before it would swap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 1 << 30
# bytes = FIXED + PER_PARAMETER x parameters, from the measured peaks (docs/ci.md).
FIXED_BYTES = 1 * GIB
PER_PARAMETER = {"plain": 10.0, "tuned": 26.0}
MARGIN = 1.2  # the line is fitted through two points; leave room for what it misses


@dataclass(frozen=True, kw_only=True)
class ExportNeed:
    artifact: str
    parameters: int
    tuned: bool
    bytes: int


def parameters_of(config) -> int:
    """The decoder's parameter count from its config alone (no weights loaded)."""
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (heads * 2 + kv_heads * 2)
    mlp = 3 * hidden * config.intermediate_size
    embeddings = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return layers * (attention + mlp) + embeddings


def export_need(artifact: str, parameters: int, tuned: bool) -> ExportNeed:
    per = PER_PARAMETER["tuned" if tuned else "plain"]
    return ExportNeed(artifact=artifact, parameters=parameters, tuned=tuned,
                      bytes=int(MARGIN * (FIXED_BYTES + per * parameters)))


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be used without swapping); else total RAM."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def most_jobs(needs: list[ExportNeed], available: int) -> int:
    """How many of the largest exports fit at once (at least 1: one always runs)."""
    if not needs:
        return 1
    largest = sorted((n.bytes for n in needs), reverse=True)
    fit, used = 0, 0
    for need in largest:
        if used + need > available:
            break
        used += need
        fit += 1
    return max(1, fit)
