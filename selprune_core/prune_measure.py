"""What a pruning run reads off the model: activation statistics and neuron scores through a mask,
and evaluations of a mask on the eval sets (with the extra metrics) or on the budget sets.

Every phase first reports progress and checks the cancellation callback, so a run can be stopped
between any two phases and shows where it is inside a step.

`Measure` reads a causal LM on texts. A run takes any `RunMeasure` (an image classifier's is
`image_measure.ImageMeasure`) and any `PrunableModel`: the modes only ever ask for scores, retain
means and evaluations, and `score_stats` turns any two collections into the same scores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import nn

from selprune_core.activations import ActivationStats, collect_activations
from selprune_core.batching import iter_packed_batches, iter_token_batches
from selprune_core.config import EvalConfig, PruneConfig
from selprune_core.errors import CancelledError
from selprune_core.evaluation import EvalPlan, EvalResult, common_target_ids, evaluate_sets, plan_sets
from selprune_core.loading import LoadedModel
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.reports import Progress, StepReport
from selprune_core.scoring import OUTPUT_AWARE, required_fields, score_neurons
from selprune_core.sites import ModelSites

__all__ = [
    "CollectingMeasure",
    "Evaluated",
    "Measure",
    "PrunableModel",
    "PruneCallbacks",
    "RunMeasure",
    "Scores",
    "report_progress",
    "score_stats",
    "selection_seed",
]

Data = TypeVar("Data")  # what a measure collects statistics on: texts, or images

# An evaluation's results per set, and the extra metrics computed on the same mask.
Evaluated = tuple[dict[str, EvalResult], dict[str, Any]]


@dataclass(frozen=True)
class PruneCallbacks:
    """How a run talks to its caller; every callback is optional."""

    # After every step and trial (step 0 included): the report and the mask the run now stands on.
    on_step: Callable[[StepReport, NeuronMask], None] | None = None
    on_progress: Callable[[Progress], None] | None = None  # inside a step: phase and tokens so far
    should_stop: Callable[[], bool] | None = None  # checked between phases; True raises CancelledError
    extra_metrics: Callable[[NeuronMask], dict[str, Any]] | None = None  # e.g. toxicity, per evaluation


@dataclass
class Scores:
    """What one collection gives a selective step: scores to select from, and mean-ablation values."""

    ff: torch.Tensor  # [layer, d_mlp]
    attn: torch.Tensor  # [layer, d_attn]
    offsets: tuple[torch.Tensor, torch.Tensor] | None  # retain means, same shapes (mean ablation only)
    tokens: int  # tokens collected for them; taken (set to 0) by the first step that reports them


def selection_seed(seed: int, step: int, component: int) -> torch.Generator:
    # One generator per (step, component) so a resumed run draws what an uninterrupted one would.
    # Components: 0 FF scores, 1 attention scores ("rand"), 2 and 3 the random baseline's draws.
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7 + component)


def report_progress(callbacks: PruneCallbacks, step: int, phase: str, tokens: int = 0) -> None:
    """Raise CancelledError if the caller wants to stop; otherwise tell it where the run is."""
    if callbacks.should_stop is not None and callbacks.should_stop():
        raise CancelledError(f"cancelled at step {step} ({phase})")
    if callbacks.on_progress is not None:
        callbacks.on_progress(Progress(step, phase, tokens))


class PrunableModel(Protocol):
    """What a run reads off the model it prunes (a LoadedModel, or an image_measure.ImageClassifier)."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def sites(self) -> ModelSites: ...

    @property
    def fingerprint(self) -> str: ...


class RunMeasure(Protocol):
    """What a run and its modes call to collect, score and evaluate through a mask."""

    def score(self, mask: NeuronMask, step: int) -> Scores: ...

    def retain_means(self, mask: NeuronMask, step: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]: ...

    def evaluate(self, mask: NeuronMask, step: int) -> Evaluated: ...

    def evaluate_budget(self, mask: NeuronMask, step: int) -> dict[str, EvalResult]: ...


def score_stats(
    cfg: PruneConfig,
    sites: ModelSites,
    forget: ActivationStats,
    retain: ActivationStats,
    step: int,
    out_norms: tuple[torch.Tensor | None, torch.Tensor | None],
) -> Scores:
    """Score every FF and attention neuron from forget and retain statistics collected through one mask.

    A neuron scores high when it is important on the forget data and not on the retain data.
    """
    ff_norm, attn_norm = out_norms
    ff = score_neurons(
        cfg.ff_scoring,
        forget.ff,
        retain.ff,
        cfg.ff_eps,
        shape=(sites.n_layers, sites.d_mlp),
        generator=selection_seed(cfg.seed, step, 0),
        out_norm=ff_norm,
    )
    attn = score_neurons(
        cfg.attn_scoring,
        forget.attn,
        retain.attn,
        cfg.attn_eps,
        shape=(sites.n_layers, sites.d_attn),
        generator=selection_seed(cfg.seed, step, 1),
        out_norm=attn_norm,
    )
    offsets = (retain.ff.mean, retain.attn.mean) if cfg.offset_mode == "retain_mean" else None
    return Scores(ff, attn, offsets, retain.n_tokens + forget.n_tokens)


class CollectingMeasure(Generic[Data]):
    """The scoring half every RunMeasure shares: given how to collect statistics of its forget or
    retain data (texts, images) through a mask, retain means and scores are the same on every kind.

    Subclasses set `cfg`, `callbacks`, `forget`, `retain`, `out_norms` and `sites`, and define `collect`.
    """

    cfg: PruneConfig
    callbacks: PruneCallbacks
    forget: Data
    retain: Data
    sites: ModelSites
    out_norms: tuple[torch.Tensor | None, torch.Tensor | None]

    def collect(
        self, data: Data, mask: NeuronMask, step: int, phase: str, which: tuple[str, ...]
    ) -> ActivationStats:
        """Statistics (`which` fields) of `data` through `mask`."""
        raise NotImplementedError

    def retain_means(self, mask: NeuronMask, step: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        """Mean activations on the retain data through `mask`, and the tokens read for them."""
        stats = self.collect(self.retain, mask, step, "collecting_retain", ("sum",))
        return (stats.ff.mean, stats.attn.mean), stats.n_tokens

    def score(self, mask: NeuronMask, step: int) -> Scores:
        """Collect retain and forget statistics through `mask` and score every neuron (`score_stats`)."""
        cfg = self.cfg
        which = required_fields(cfg.ff_scoring, cfg.attn_scoring)
        mean_ablation = cfg.offset_mode == "retain_mean"
        retain_which = tuple(sorted(set(which) | {"sum"})) if mean_ablation else which  # means need sums
        retain = self.collect(self.retain, mask, step, "collecting_retain", retain_which)
        forget = self.collect(self.forget, mask, step, "collecting_forget", which)
        report_progress(self.callbacks, step, "scoring")
        return score_stats(cfg, self.sites, forget, retain, step, self.out_norms)


class Measure(CollectingMeasure[Sequence[str]]):
    """A run's view of its model and texts: collect, score and evaluate through a mask."""

    def __init__(
        self,
        loaded: LoadedModel,
        cfg: PruneConfig,
        texts: tuple[Sequence[str], Sequence[str]],  # (forget, retain) training texts
        eval_sets: Mapping[str, Sequence[str]],
        budget_sets: Mapping[str, Sequence[str]],
        callbacks: PruneCallbacks,
    ) -> None:
        self.loaded, self.cfg, self.callbacks = loaded, cfg, callbacks
        self.sites = loaded.sites
        self.forget, self.retain = texts
        self.eval_sets, self.budget_sets = eval_sets, budget_sets
        # Tokens every text predicts (BOS, newlines, ...) are left out of accuracy, per set union.
        self.eval_common = self._common_ids(eval_sets)
        self.budget_common = self._common_ids(budget_sets) if cfg.budget is not None else ()
        # No bootstrap on the budget sets: the budget reads point estimates, and resampling every trial costs.
        self.budget_eval = EvalConfig(**{**asdict(cfg.eval), "bootstrap_samples": 0})
        # Every step scores the same texts: choose and tokenize them once.
        tokenizer = loaded.tokenizer
        self.eval_plans = plan_sets(tokenizer, eval_sets, cfg.eval, common_ids=self.eval_common)
        self.budget_plans = (
            plan_sets(tokenizer, budget_sets, self.budget_eval, common_ids=self.budget_common)
            if cfg.budget is not None
            else {}
        )
        # Output-aware scorings weigh a neuron by the norm of the weights it writes through.
        needs_norms = {cfg.ff_scoring, cfg.attn_scoring} & OUTPUT_AWARE
        self.out_norms = loaded.sites.output_norms() if needs_norms else (None, None)

    def _common_ids(self, sets: Mapping[str, Sequence[str]]) -> tuple[int, ...]:
        if self.cfg.eval.skip_common <= 0 or not sets:
            return ()
        union = [text for texts in sets.values() for text in texts]
        return common_target_ids(
            self.loaded.tokenizer, union, n=self.cfg.eval.skip_common, token_limit=self.cfg.eval.token_limit
        )

    def progress(self, step: int, phase: str, tokens: int = 0) -> None:
        report_progress(self.callbacks, step, phase, tokens)

    # Statistics and scores -------------------------------------------------------------------
    def collect(
        self, texts: Sequence[str], mask: NeuronMask, step: int, phase: str, which: tuple[str, ...]
    ) -> ActivationStats:
        """Activation statistics (`which` fields) of `texts` through `mask`."""
        cfg, loaded = self.cfg.collect, self.loaded
        if cfg.pack:  # texts packed back to back into full windows
            batches = iter_packed_batches(
                loaded.tokenizer,
                texts,
                token_limit=cfg.token_limit,
                window=cfg.token_limit,
                batch_size=cfg.batch_size,
                device=loaded.device,
            )
        else:  # one text per row, truncated
            batches = iter_token_batches(
                loaded.tokenizer,
                texts,
                token_limit=cfg.token_limit,
                batch_size=cfg.batch_size,
                device=loaded.device,
            )
        self.progress(step, phase)
        with apply_mask(loaded.model, loaded.sites, mask):
            return collect_activations(
                loaded.model,
                loaded.sites,
                batches,
                sample_tokens=cfg.sample_tokens,
                skip_first=cfg.skip_first,
                which=which,
                on_batch=functools.partial(self.progress, step, phase),
            )

    # Evaluation ------------------------------------------------------------------------------
    def evaluate(self, mask: NeuronMask, step: int) -> Evaluated:
        """`mask` on the eval sets, plus the caller's extra metrics."""
        results = self._evaluate(
            mask, step, self.eval_sets, self.cfg.eval, self.eval_common, self.eval_plans, "evaluating"
        )
        extra = self.callbacks.extra_metrics
        return results, (extra(mask) if extra is not None else {})

    def evaluate_budget(self, mask: NeuronMask, step: int) -> dict[str, EvalResult]:
        """`mask` on the budget sets (point estimates only): what BudgetCheck reads."""
        return self._evaluate(
            mask,
            step,
            self.budget_sets,
            self.budget_eval,
            self.budget_common,
            self.budget_plans,
            "checking_budget",
        )

    def _evaluate(
        self,
        mask: NeuronMask,
        step: int,
        sets: Mapping[str, Sequence[str]],
        eval_cfg: EvalConfig,
        common_ids: Sequence[int],
        plans: Mapping[str, EvalPlan],
        phase: str,
    ) -> dict[str, EvalResult]:
        self.progress(step, phase)
        loaded = self.loaded
        with apply_mask(loaded.model, loaded.sites, mask):
            return evaluate_sets(
                loaded.model, loaded.tokenizer, sets, eval_cfg, common_ids=common_ids, plans=plans
            )
