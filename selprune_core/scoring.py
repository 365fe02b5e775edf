"""Importance functions, the forget/retain score, and neuron selection.

    score(n) = I(D_forget, n) / (I(D_retain, n) + eps)

A high score means neuron n matters for the forget set and little for the retain set. Selection is
a global top-k over all layers of one component (FF and attention are scored and selected
independently, each with its own fraction and eps). Already-pruned neurons are never candidates:
the authors rely on their score being 0, which fails when every remaining score is 0 too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from selprune_core.activations import ComponentStats

__all__ = [
    "Scorer",
    "SCORERS",
    "required_fields",
    "score_neurons",
    "Selection",
    "select_top_neurons",
    "select_top_heads",
    "select_random_per_layer",
]

Scorer = Callable[[ComponentStats, ComponentStats, float], torch.Tensor]


def _ratio(forget: torch.Tensor, retain: torch.Tensor, eps: float) -> torch.Tensor:
    return forget / (retain + eps)


# Each scorer maps (forget stats, retain stats, eps) to float64 scores [layer, d]. Pure functions.
SCORERS: dict[str, Scorer] = {
    "freq": lambda f, r, eps: _ratio(f.freq, r.freq, eps),
    "abs": lambda f, r, eps: _ratio(f.abs, r.abs, eps),
    "rms": lambda f, r, eps: _ratio(f.rms, r.rms, eps),
    "std": lambda f, r, eps: _ratio(f.std, r.std, eps),
    "sqrt": lambda f, r, eps: _ratio(f.sqrt, r.sqrt, eps),
    # The authors' "mean" is a difference, not a ratio; eps is unused.
    "mean": lambda f, r, eps: (f.mean - r.mean).abs(),
    # Parity with the authors' code (method.md §9.1): their "std" field holds the sample variance,
    # so "std" ranks by the variance ratio and "rms" is sqrt(var^2 + mean^2).
    "legacy_std": lambda f, r, eps: _ratio(f.sample_var, r.sample_var, eps),
    "legacy_rms": lambda f, r, eps: _ratio(
        (f.sample_var**2 + f.mean**2).sqrt(), (r.sample_var**2 + r.mean**2).sqrt(), eps
    ),
}

# Which running sums each scorer reads; collection skips the others.
_FIELDS: dict[str, tuple[str, ...]] = {
    "freq": ("pos_count",),
    "abs": ("sum_abs",),
    "rms": ("sum_sq",),
    "std": ("sum", "sum_sq"),
    "sqrt": ("sum_sqrt",),
    "mean": ("sum",),
    "legacy_std": ("sum", "sum_sq"),
    "legacy_rms": ("sum", "sum_sq"),
    "rand": (),
}


def required_fields(*scorings: str) -> tuple[str, ...]:
    """The union of running sums the named scorers need, in a stable order."""
    needed = {name for scoring in scorings for name in _FIELDS[scoring]}
    return tuple(sorted(needed))


def score_neurons(
    scoring: str,
    forget: ComponentStats | None,
    retain: ComponentStats | None,
    eps: float,
    *,
    shape: tuple[int, int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scores [layer, d] in float64. "rand" draws i.i.d. N(0, 1) and needs no statistics."""
    if scoring == "rand":
        return torch.randn(*shape, generator=generator, dtype=torch.float64)
    assert forget is not None and retain is not None, f"scoring {scoring!r} needs statistics"
    scores = SCORERS[scoring](forget, retain, eps)
    assert tuple(scores.shape) == shape, f"scores {tuple(scores.shape)} != expected {shape}"
    return scores


@dataclass(frozen=True)
class Selection:
    """Neurons chosen in one step for one component."""

    chosen: torch.Tensor  # bool [layer, d], True = prune now
    threshold: float | None  # lowest selected score; None when nothing was selected

    @property
    def count(self) -> int:
        return int(self.chosen.sum().item())

    def per_layer(self) -> list[int]:
        return [int(c) for c in self.chosen.sum(dim=1).tolist()]


def select_top_neurons(scores: torch.Tensor, keep: torch.Tensor, frac: float) -> Selection:
    """Global top floor(frac * numel) of `scores` [layer, d] among still-kept neurons."""
    k = min(math.floor(frac * scores.numel()), int(keep.sum().item()))
    chosen = torch.zeros_like(keep)
    if k <= 0:  # the authors' code crashes here (method.md §9.21)
        return Selection(chosen, None)
    candidates = scores.to(torch.float64).masked_fill(~keep.to(scores.device), -math.inf).flatten()
    values, index = torch.topk(candidates, k, sorted=False)
    chosen.view(-1)[index.to(chosen.device)] = True
    return Selection(chosen, float(values.min().item()))


def select_top_heads(
    scores: torch.Tensor, keep: torch.Tensor, frac: float, n_heads: int, reduce: str
) -> Selection:
    """Whole-head selection: reduce neuron scores over head_dim, take the global top heads.

    `scores` and `keep` are [layer, n_heads * d_head], head-major. "mean" and "median" mean what they
    say (the authors' names are swapped, method.md §9.3). A head with any kept neuron is a candidate.
    """
    layers, width = scores.shape
    per_head = scores.to(torch.float64).view(layers, n_heads, width // n_heads)  # [layer, head, d_head]
    head_scores = per_head.mean(dim=-1) if reduce == "mean" else per_head.median(dim=-1).values
    head_keep = keep.view(layers, n_heads, -1).any(dim=-1)  # [layer, head]
    heads = select_top_neurons(head_scores, head_keep, frac)
    chosen = heads.chosen[:, :, None].expand(layers, n_heads, width // n_heads).reshape(layers, width)
    return Selection(chosen & keep, heads.threshold)


def select_random_per_layer(
    keep: torch.Tensor, frac: float, generator: torch.Generator, group: int = 1
) -> Selection:
    """The paper's random baseline: per layer, floor(frac * d) new random neurons among kept ones.

    With group > 1 whole groups (heads) are drawn: floor(frac * d / group) groups per layer.
    """
    layers, width = keep.shape
    n_groups = width // group
    per_layer = math.floor(frac * n_groups)
    group_keep = keep.view(layers, n_groups, group).any(dim=-1).cpu()  # [layer, group]
    chosen_groups = torch.zeros(layers, n_groups, dtype=torch.bool)
    for layer in range(layers):
        available = group_keep[layer].nonzero().flatten()
        take = min(per_layer, available.numel())
        if take > 0:
            pick = available[torch.randperm(available.numel(), generator=generator)[:take]]
            chosen_groups[layer, pick] = True
    chosen = chosen_groups[:, :, None].expand(layers, n_groups, group).reshape(layers, width)
    return Selection(chosen.to(keep.device) & keep, None)
