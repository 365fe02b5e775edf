"""Streamed text: what the final answer of a generation adds to the deltas already sent."""

from __future__ import annotations


def unsent(final: str, sent: str) -> str:
    """What the final text adds to the streamed deltas (nothing when they already hold it all)."""
    return final[len(sent) :] if final.startswith(sent) else ""
