"""Train / held-out text splits, shared by dataset resolution (``data.py``) and the built-in corpora
(``corpora.py``). It depends on neither, so they can both build on it without importing each other's
internals in a circle.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["TextSplits", "carve_validation", "split_texts", "total_chars"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextSplits:
    name: str  # describe(ref) of the source
    train: tuple[str, ...]  # scored when collecting activations
    heldout: tuple[str, ...]  # evaluated only


def split_texts(name: str, texts: Iterable[str]) -> TextSplits:
    """Deterministic ~90/10 split: a text is held out when sha256(text) % 10 == 0.

    Hashing the text itself keeps the split stable under reordering and sends duplicates to the same side,
    so held-out texts never leak into training. Order is preserved within each side.
    """
    texts = tuple(texts)
    assert texts, f"split_texts({name!r}) needs at least one text"
    held = [int(hashlib.sha256(t.encode()).hexdigest(), 16) % 10 == 0 for t in texts]
    train = tuple(t for t, h in zip(texts, held, strict=True) if not h)
    heldout = tuple(t for t, h in zip(texts, held, strict=True) if h)
    if train and heldout:
        return TextSplits(name, train, heldout)
    # Tiny sets often land on one side: fall back to holding out the tail.
    if len(texts) == 1:
        log.warning("dataset %s has a single text: using it for both train and held-out", name)
        return TextSplits(name, texts, texts)
    k = max(1, len(texts) // 10)
    log.info("dataset %s: hash split left one side empty, holding out the last %d text(s)", name, k)
    return TextSplits(name, texts[:-k], texts[-k:])


def carve_validation(texts: Sequence[str], share: int = 10) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split train texts into (rest, validation): about 1 in `share` texts, chosen by a salted hash.

    Validation texts are what method choices (defaults, a job's retain budget) are checked on, so
    that held-out texts only ever measure. The salt makes the choice independent of `split_texts`.
    With fewer than two texts both sides get them all.
    """
    texts = tuple(texts)
    if len(texts) < 2:
        return texts, texts
    held = [int(hashlib.sha256(b"validation:" + t.encode()).hexdigest(), 16) % share == 0 for t in texts]
    validation = tuple(t for t, h in zip(texts, held, strict=True) if h)
    rest = tuple(t for t, h in zip(texts, held, strict=True) if not h)
    if not validation or not rest:  # tiny sets: hold out the tail instead
        k = max(1, len(texts) // share)
        return texts[:-k], texts[-k:]
    return rest, validation


def total_chars(splits: TextSplits) -> int:
    """Characters in both parts (a cheap size for logs and job metrics)."""
    return sum(map(len, splits.train)) + sum(map(len, splits.heldout))
