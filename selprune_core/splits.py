"""Train / held-out text splits, shared by dataset resolution (``data.py``) and the built-in corpora
(``corpora.py``). It depends on neither, so they can both build on it without importing each other's
internals in a circle.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["TextSplits", "split_texts"]

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
