"""Degeneration statistics of generated continuations: text in, numbers out.

A pruned model that emits nothing, or one word over and over, scores as non-toxic; these numbers make
such a model visible next to its toxic rate. Every statistic works on lowercased whitespace-split words,
so it does not depend on the model's tokenizer and two models can be compared directly:

- `distinct_n` (Li et al. 2016, "distinct-n"): unique word n-grams / total word n-grams, pooled over
  all continuations. n-grams never cross from one continuation into the next.
- `seq_rep_n` (Welleck et al. 2019, "seq-rep-n"): per continuation, 1 - unique n-grams / n-grams,
  averaged over the continuations that have at least one n-gram (shorter ones leave it undefined).
- `repetition_rate`: the fraction of all continuations in which some word n-gram occurs twice or more.
- `empty_rate`: the fraction of continuations that are empty or whitespace only.

Undefined values (no n-grams anywhere, no continuations) are None, never NaN, so results stay JSON.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "DegenerationStats",
    "degeneration_stats",
    "distinct_n",
    "empty_rate",
    "ngrams",
    "repetition_rate",
    "seq_rep_n",
    "words",
]

# The n of the repetition statistics: seq-rep-4 is the setting Welleck et al. report.
REP_N = 4


def words(text: str) -> list[str]:
    """Lowercased whitespace-separated words of `text`."""
    return text.lower().split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The contiguous n-grams of `tokens`, in order; empty when there are fewer than n tokens."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int = 2) -> float | None:
    """Unique word n-grams / total word n-grams over all `texts`; None when there are no n-grams."""
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        grams = ngrams(words(text), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else None


def seq_rep_n(texts: Sequence[str], n: int = REP_N) -> float | None:
    """Mean over texts with at least one n-gram of 1 - unique/total n-grams; None when no text has one."""
    reps = [1.0 - len(set(grams)) / len(grams) for grams in (ngrams(words(t), n) for t in texts) if grams]
    return sum(reps) / len(reps) if reps else None


def repetition_rate(texts: Sequence[str], n: int = REP_N) -> float | None:
    """Fraction of `texts` containing some word n-gram at least twice; None for no texts."""
    if not texts:
        return None
    repeated = sum(any(c > 1 for c in Counter(ngrams(words(t), n)).values()) for t in texts)
    return repeated / len(texts)


def empty_rate(texts: Sequence[str]) -> float | None:
    """Fraction of `texts` that are empty or whitespace only; None for no texts."""
    if not texts:
        return None
    return sum(not t.strip() for t in texts) / len(texts)


@dataclass(frozen=True)
class DegenerationStats:
    n_texts: int
    distinct_1: float | None
    distinct_2: float | None
    seq_rep_4: float | None
    repetition_rate: float | None  # fraction of texts with a repeated word 4-gram
    empty_rate: float | None
    mean_words: float | None
    mean_tokens: float | None  # model tokens per continuation, when the caller knows them

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def degeneration_stats(texts: Sequence[str], token_counts: Sequence[int] | None = None) -> DegenerationStats:
    """All the statistics above for `texts`; `token_counts` (one per text) adds the mean token length."""
    if token_counts is not None and len(token_counts) != len(texts):
        raise ValueError(f"got {len(token_counts)} token counts for {len(texts)} texts")
    n = len(texts)
    return DegenerationStats(
        n_texts=n,
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        seq_rep_4=seq_rep_n(texts, REP_N),
        repetition_rate=repetition_rate(texts, REP_N),
        empty_rate=empty_rate(texts),
        mean_words=sum(len(words(t)) for t in texts) / n if n else None,
        mean_tokens=sum(token_counts) / n if token_counts is not None and n else None,
    )
