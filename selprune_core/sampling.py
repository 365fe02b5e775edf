"""Choosing the next token of each row from its last-position logits: greedy, or sampled with
temperature, top-k and top-p, per row, in the order Hugging Face's warpers apply them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["sample_next"]


def _per_row(
    value: float | torch.Tensor, rows: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Broadcast a scalar or [batch] setting to a [batch] tensor."""
    if isinstance(value, torch.Tensor):
        assert value.numel() in (1, rows), f"per-row setting has {value.numel()} values for {rows} rows"
        return value.to(device=device, dtype=dtype).reshape(-1).expand(rows)
    return torch.full((rows,), value, device=device, dtype=dtype)


def sample_next(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor,
    top_p: float | torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Pick one token per row from last-position logits [batch, vocab]; returns ids [batch].

    Each setting is a scalar or a [batch] tensor. Rows with temperature 0 are greedy. The others are
    sampled from softmax(logits / temperature), restricted first to the `top_k` largest logits (0 = off,
    ties at the k-th value kept) and then to the smallest set of most likely tokens holding `top_p`
    of the mass (1 = off), the same filters and order as Hugging Face's warpers. `generator` is one
    generator for the batch or one per row (None entries use torch's global generator).
    """
    logits = logits.float()  # [batch, vocab]
    rows, vocab = logits.shape
    temp = _per_row(temperature, rows, logits.device, torch.float32)  # [batch]
    k = _per_row(top_k, rows, logits.device, torch.long)  # [batch]
    p = _per_row(top_p, rows, logits.device, torch.float32)  # [batch]
    greedy = logits.argmax(dim=-1)  # [batch]
    sampled_rows = temp > 0  # [batch]
    if not bool(sampled_rows.any()):
        return greedy

    # Greedy rows are divided by 1 so they stay finite; their sample is discarded below.
    scaled = logits / torch.where(sampled_rows, temp, torch.ones_like(temp))[:, None]  # [batch, vocab]
    # Work in descending order: position j of a row holds its (j+1)-th most likely token.
    sorted_vals, sorted_idx = scaled.sort(dim=-1, descending=True, stable=True)  # [batch, vocab] each

    # top-k: drop every logit strictly below the k-th largest one.
    k_eff = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k)  # [batch]
    kth = sorted_vals.gather(1, (k_eff - 1)[:, None])  # [batch, 1]
    remove = sorted_vals < kth  # [batch, vocab]

    # top-p on what top-k left: drop a token once the more likely tokens already hold top_p of the mass.
    # The most likely token has zero mass above it and is always kept, since top_p > 0.
    probs = sorted_vals.masked_fill(remove, float("-inf")).softmax(dim=-1)  # [batch, vocab]
    mass_above = probs.cumsum(dim=-1) - probs  # [batch, vocab]
    remove |= (mass_above >= p[:, None]) & (p < 1)[:, None]

    probs = sorted_vals.masked_fill(remove, float("-inf")).softmax(dim=-1)  # [batch, vocab]
    if generator is None or isinstance(generator, torch.Generator):
        choice = torch.multinomial(probs, 1, generator=generator)  # [batch, 1] index in sorted order
    else:
        # One draw per row from the row's own generator: a row's samples ignore its batch companions.
        assert len(generator) == rows, f"{len(generator)} generators for {rows} rows"
        choice = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generator)])
        choice = choice[:, None]  # [batch, 1]
    sampled = sorted_idx.gather(1, choice).squeeze(1)  # [batch] token ids
    return torch.where(sampled_rows, sampled, greedy)
