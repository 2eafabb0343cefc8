"""Intervals for rates measured on a sample: every rate the reports give comes with one."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Rate:
    """``hits`` of ``n``, with its Wilson score interval (95% unless ``z`` says otherwise)."""

    hits: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.hits / self.n if self.n else 0.0

    def __str__(self) -> str:
        return f"{self.hits}/{self.n} = {self.value:.1%} [{self.low:.1%}, {self.high:.1%}]"


def wilson(hits: int, n: int, z: float = 1.959964) -> Rate:
    if n == 0:
        return Rate(hits=0, n=0, low=0.0, high=1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if hits == 0 else max(0.0, centre - half)  # exact at the ends, not 1 - 1e-16
    high = 1.0 if hits == n else min(1.0, centre + half)
    return Rate(hits=hits, n=n, low=low, high=high)


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the same rows give the same interval in every report


def prompt_bootstrap(values, groups: int, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` percentile interval of the mean of ``values`` (prompt-major, ``groups``
    equal runs of rows, one per prompt) when whole prompts are resampled with replacement.

    A prompt's positions share its context and move together, so a binomial interval over
    positions would claim far more certainty than the prompts give; resampling prompts is
    honest about it (and with one prompt, the interval is that prompt's mean alone)."""
    import numpy as np

    per_prompt = np.asarray(values, dtype=np.float64).reshape(groups, -1).mean(axis=1)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = per_prompt[rng.integers(0, groups, size=(BOOTSTRAP_RESAMPLES, groups))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
