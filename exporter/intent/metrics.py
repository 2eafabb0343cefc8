"""Task metrics of the intent model: does a ranked list of candidate queries hold the one the
user typed (or the one another model predicts)?

Queries are compared after ``normalise``: Unicode NFKC (full-width and half-width forms
alike), lower case, whitespace collapsed to single spaces. Chinese has no spaces between
words, so the similarity is on characters: ROUGE-L F1 over the characters of the two
queries with spaces removed.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence


def normalise(query: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", query).lower().split())


def rank_of(candidates: Sequence[str], target: str) -> int | None:
    """1-based rank of ``target`` among ``candidates`` (normalised), or None."""
    wanted = normalise(target)
    for rank, candidate in enumerate(candidates, start=1):
        if normalise(candidate) == wanted:
            return rank
    return None


def hit_at(candidates: Sequence[str], target: str, k: int) -> bool:
    rank = rank_of(candidates[:k], target)
    return rank is not None


def reciprocal_rank(candidates: Sequence[str], target: str, k: int) -> float:
    rank = rank_of(candidates[:k], target)
    return 1.0 / rank if rank else 0.0


def rouge_l_chars(candidate: str, target: str) -> float:
    """ROUGE-L F1 over characters (spaces removed, normalised): 1 for equal queries."""
    a = normalise(candidate).replace(" ", "")
    b = normalise(target).replace(" ", "")
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for ch in a:  # longest common subsequence, one row at a time
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if ch == other else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)
