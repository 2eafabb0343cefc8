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
