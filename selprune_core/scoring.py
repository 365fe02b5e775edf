"""Importance functions, the forget/retain score, and neuron selection.

    score(n) = I(D_forget, n) / (I(D_retain, n) + eps)

A high score means neuron n matters for the forget set and little for the retain set. Selection is
a global top-k over all layers of one component (FF and attention are scored and selected
independently, each with its own fraction and eps), or a per-layer quota. Already-pruned neurons are
never candidates: the authors rely on their score being 0, which fails when every remaining score is
0 too (and under mean ablation a pruned neuron reads its offset, not 0). NaN scores (from NaN
activations) are never selected.

Output-aware scorers (`*_out`) multiply both importances by ||W_out[:, n]||, the norm of the weight
column through which neuron n writes to the residual stream: the ratio is unchanged, but eps and the
global ranking then compare neurons in units of their effect on the output rather than of their raw
activation, whose scale differs a lot between layers.
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
    "split_count",
]

# (forget stats, retain stats, eps, output weight norms [layer, d]) -> float64 scores [layer, d].
Scorer = Callable[[ComponentStats, ComponentStats, float, torch.Tensor | None], torch.Tensor]


def _ratio(forget: torch.Tensor, retain: torch.Tensor, eps: float) -> torch.Tensor:
    return forget / (retain + eps)


def _deviation_from(stats: ComponentStats, center: torch.Tensor) -> torch.Tensor:
    """sqrt(E[(x - center)^2]) from the running sums: what replacing x by `center` changes, in RMS."""
    n = max(stats.n, 1)
    second = stats._need("sum_sq") / n - 2 * center * (stats._need("sum") / n) + center**2
    return second.clamp_min(0.0).sqrt()


def _dev(f: ComponentStats, r: ComponentStats) -> tuple[torch.Tensor, torch.Tensor]:
    # Mean ablation sets a neuron to its retain mean: on retain that moves it by its std, on forget by
    # its RMS distance from the retain mean.
    return _deviation_from(f, r.mean), r.std


def _weighted(
    out_norm: torch.Tensor | None, forget: torch.Tensor, retain: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    assert out_norm is not None, "output-aware scoring needs the output weight norms"
    norm = out_norm.to(forget.device, torch.float64)
    return forget * norm, retain * norm


# Pure functions of the statistics (and, for *_out, of the output weight norms).
SCORERS: dict[str, Scorer] = {
    "freq": lambda f, r, eps, w: _ratio(f.freq, r.freq, eps),
    "abs": lambda f, r, eps, w: _ratio(f.abs, r.abs, eps),
    "rms": lambda f, r, eps, w: _ratio(f.rms, r.rms, eps),
    "std": lambda f, r, eps, w: _ratio(f.std, r.std, eps),
    "sqrt": lambda f, r, eps, w: _ratio(f.sqrt, r.sqrt, eps),
    "dev": lambda f, r, eps, w: _ratio(*_dev(f, r), eps),
    "abs_out": lambda f, r, eps, w: _ratio(*_weighted(w, f.abs, r.abs), eps),
    "rms_out": lambda f, r, eps, w: _ratio(*_weighted(w, f.rms, r.rms), eps),
    "dev_out": lambda f, r, eps, w: _ratio(*_weighted(w, *_dev(f, r)), eps),
    # Gradient attribution: the first-order loss change of replacing the neuron by 0 ("taylor", zero
    # ablation) or by its retain mean ("taylor_mean", mean ablation), per token, forget over retain.
    "taylor": lambda f, r, eps, w: _ratio(f.attribution(0.0), r.attribution(0.0), eps),
    "taylor_mean": lambda f, r, eps, w: _ratio(f.attribution(r.mean), r.attribution(r.mean), eps),
    # The authors' "mean" is a difference, not a ratio; eps is unused.
    "mean": lambda f, r, eps, w: (f.mean - r.mean).abs(),
    # Parity with the authors' code (docs/method.md §9.1): their "std" field holds the sample variance,
    # so "std" ranks by the variance ratio and "rms" is sqrt(var^2 + mean^2).
    "legacy_std": lambda f, r, eps, w: _ratio(f.sample_var, r.sample_var, eps),
    "legacy_rms": lambda f, r, eps, w: _ratio(
        (f.sample_var**2 + f.mean**2).sqrt(), (r.sample_var**2 + r.mean**2).sqrt(), eps
    ),
}
OUTPUT_AWARE = frozenset(name for name in SCORERS if name.endswith("_out"))

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
    "dev": ("sum", "sum_sq"),
    "abs_out": ("sum_abs",),
    "rms_out": ("sum_sq",),
    "dev_out": ("sum", "sum_sq"),
    "taylor": ("attr",),
    "taylor_mean": ("attr", "sum"),
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
    out_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores [layer, d] in float64. "rand" draws i.i.d. N(0, 1) and needs no statistics.

    `out_norm` [layer, d] is the norm of each neuron's output weight column (the *_out scorers).
    """
    if scoring == "rand":
        return torch.randn(*shape, generator=generator, dtype=torch.float64)
    assert forget is not None and retain is not None, f"scoring {scoring!r} needs statistics"
    scores = SCORERS[scoring](forget, retain, eps, out_norm)
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


def split_count(total: int, capacity: list[int], generator: torch.Generator) -> list[int]:
    """Split `total` picks over groups as evenly as their `capacity` allows, remainders at random.

    Each group first gets floor(total / groups) (capped by its capacity); the picks left over go one
    at a time to randomly ordered groups with room. The counts always sum to min(total, sum(capacity)).
    """
    groups = len(capacity)
    counts = [min(total // groups, c) for c in capacity]
    left = min(total, sum(capacity)) - sum(counts)
    while left > 0:
        for g in torch.randperm(groups, generator=generator).tolist():
            if left > 0 and counts[g] < capacity[g]:
                counts[g] += 1
                left -= 1
    return counts


def select_top_neurons(
    scores: torch.Tensor, keep: torch.Tensor, frac: float, *, per_layer: bool = False
) -> Selection:
    """Top floor(frac * numel) of `scores` [layer, d] among still-kept neurons.

    Global by default (the paper); with `per_layer`, the same count is split evenly over layers and
    each layer takes its own top neurons (a per-layer quota), so no layer can be emptied, or left alone,
    by a scale difference between layers.
    """
    candidates = scores.to(torch.float64).nan_to_num(nan=-math.inf)
    candidates = candidates.masked_fill(~keep.to(scores.device), -math.inf)  # [layer, d]
    chosen = torch.zeros_like(keep)
    if per_layer:
        return _top_per_layer(candidates, chosen, math.floor(frac * scores.numel()))
    k = min(math.floor(frac * scores.numel()), int(torch.isfinite(candidates).sum().item()))
    if k <= 0:  # the authors' code crashes here (docs/method.md §9.21)
        return Selection(chosen, None)
    values, index = torch.topk(candidates.flatten(), k, sorted=False)
    chosen.view(-1)[index.to(chosen.device)] = True
    return Selection(chosen, float(values.min().item()))


def _top_per_layer(candidates: torch.Tensor, chosen: torch.Tensor, k_total: int) -> Selection:
    """The global count k_total split evenly over layers, each layer taking its own top scores.

    Every layer gets floor(k_total / layers) (capped by its candidates); the remainder goes to the
    layers whose next candidate scores highest, so small fractions of small models still select.
    """
    layers = candidates.shape[0]
    available = torch.isfinite(candidates).sum(dim=1).tolist()  # [layer]
    ranked = candidates.sort(dim=1, descending=True).values  # [layer, d], best first
    counts = [min(k_total // layers, int(a)) for a in available]
    left = min(k_total, int(sum(available))) - sum(counts)
    while left > 0:
        # next candidate's score per layer; -inf where a layer has none left
        nxt = [float(ranked[i, c]) if c < available[i] else -math.inf for i, c in enumerate(counts)]
        best = max(range(layers), key=lambda i: nxt[i])
        counts[best] += 1
        left -= 1
    lowest: list[float] = []
    for layer, k in enumerate(counts):
        if k > 0:
            values, index = torch.topk(candidates[layer], k, sorted=False)
            chosen[layer, index.to(chosen.device)] = True
            lowest.append(float(values.min().item()))
    return Selection(chosen, min(lowest) if lowest else None)


def select_top_heads(
    scores: torch.Tensor,
    keep: torch.Tensor,
    frac: float,
    n_heads: int,
    reduce: str,
    *,
    per_layer: bool = False,
) -> Selection:
    """Whole-head selection: reduce neuron scores over head_dim, take the top heads.

    `scores` and `keep` are [layer, n_heads * d_head], head-major. "mean" and "median" mean what they
    say (the authors' names are swapped, docs/method.md §9.3). A head with any kept neuron is a candidate.
    """
    layers, width = scores.shape
    per_head = scores.to(torch.float64).view(layers, n_heads, width // n_heads)  # [layer, head, d_head]
    head_scores = per_head.mean(dim=-1) if reduce == "mean" else per_head.median(dim=-1).values
    head_keep = keep.view(layers, n_heads, -1).any(dim=-1)  # [layer, head]
    heads = select_top_neurons(head_scores, head_keep, frac, per_layer=per_layer)
    chosen = heads.chosen[:, :, None].expand(layers, n_heads, width // n_heads).reshape(layers, width)
    return Selection(chosen & keep, heads.threshold)


def select_random_per_layer(
    keep: torch.Tensor,
    frac: float,
    generator: torch.Generator,
    group: int = 1,
    *,
    counts: list[int] | None = None,
) -> Selection:
    """The random baseline: new random neurons (or whole groups, e.g. heads) among kept ones.

    `counts` gives the number of new neurons per layer, e.g. a selective run's per-layer counts
    for a matched baseline; with groups it is converted to whole groups (rounded down). Without it,
    the same total as a global selection, floor(frac * all groups), is spread as evenly as possible
    over the layers (the paper's floor(frac * d) per layer prunes fewer, and for heads at small
    fractions none at all).
    """
    layers, width = keep.shape
    n_groups = width // group
    group_keep = keep.view(layers, n_groups, group).any(dim=-1).cpu()  # [layer, group]
    available_counts = [int(c) for c in group_keep.sum(dim=1).tolist()]
    if counts is not None:
        assert len(counts) == layers, f"{len(counts)} per-layer counts for {layers} layers"
        per_layer = [min(c // group, a) for c, a in zip(counts, available_counts, strict=True)]
    else:
        per_layer = split_count(math.floor(frac * layers * n_groups), available_counts, generator)
    chosen_groups = torch.zeros(layers, n_groups, dtype=torch.bool)
    for layer in range(layers):
        available = group_keep[layer].nonzero().flatten()
        take = per_layer[layer]
        if take > 0:
            pick = available[torch.randperm(available.numel(), generator=generator)[:take]]
            chosen_groups[layer, pick] = True
    chosen = chosen_groups[:, :, None].expand(layers, n_groups, group).reshape(layers, width)
    return Selection(chosen.to(keep.device) & keep, None)
