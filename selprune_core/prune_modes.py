"""The three ways a pruning run takes its next step, kept apart:

* FixedSteps: selective pruning at the configured fractions; every step is kept (docs/method.md §5).
* BudgetedSteps: selective pruning under a retain budget. Each step is tried first on the budget
  sets; a step that breaks the budget is reported as rejected and retried from the same mask at a
  smaller fraction, reusing the statistics it already collected.
* RandomSteps: the random baseline. Random kept neurons per layer, no statistics (except the retain
  means that mean ablation needs).

Each mode's `step(run)` chooses neurons (a Choice), prunes them onto the run's mask and hands the
report to the run, which evaluates and keeps the candidate (`accept`) or records a rejected trial.
The selective modes share SelectiveChoice: the top fraction by score, recalculated or static.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from selprune_core.budget import BudgetCheck
from selprune_core.config import PruneConfig
from selprune_core.masks import NeuronMask
from selprune_core.prune_measure import RunMeasure, Scores, selection_seed
from selprune_core.reports import StepReport
from selprune_core.scoring import Selection, select_random_per_layer, select_top_heads, select_top_neurons
from selprune_core.sites import ModelSites

__all__ = [
    "BudgetedSteps",
    "Choice",
    "FixedSteps",
    "RandomSteps",
    "Run",
    "SelectiveChoice",
    "StepMode",
    "make_mode",
]

Fracs = tuple[float, float]  # (FF, attention) fractions of all neurons per step
LayerCounts = tuple[list[int], list[int]]  # (FF, attention) new neurons per layer


class Run(Protocol):
    """What a mode reads and calls on the run that steps it (a PruneRun)."""

    mask: NeuronMask  # the mask the run stands on
    step_no: int  # the step being taken

    def accept(self, report: StepReport, candidate: NeuronMask, started: float) -> StepReport: ...

    def reject(self, report: StepReport, started: float) -> StepReport: ...

    def stop(self, reason: str) -> None: ...


@dataclass
class Choice:
    """The neurons one step (or trial) prunes, with their mean-ablation values."""

    ff: Selection
    attn: Selection
    offsets: tuple[torch.Tensor, torch.Tensor] | None  # what the newly pruned output (None: 0)
    tokens: int  # tokens collected to choose them (0 when a retry reuses statistics)

    @property
    def empty(self) -> bool:
        return self.ff.count == 0 and self.attn.count == 0

    def apply(self, mask: NeuronMask) -> NeuronMask:
        """`mask` with the chosen neurons pruned as well."""
        ff_values, attn_values = self.offsets if self.offsets is not None else (None, None)
        return mask.prune(self.ff.chosen, self.attn.chosen, ff_values=ff_values, attn_values=attn_values)

    def report(self, step: int, fracs: Fracs, trial: int) -> StepReport:
        """The report of this choice; the run adds what the resulting mask measures."""
        return StepReport(
            step=step,
            ff_selected=self.ff.count,
            attn_selected=self.attn.count,
            ff_threshold=self.ff.threshold,
            attn_threshold=self.attn.threshold,
            ff_per_layer=self.ff.per_layer(),
            attn_per_layer=self.attn.per_layer(),
            tokens_collected=self.tokens,
            ff_frac=fracs[0],
            attn_frac=fracs[1],
            trial=trial,
        )


class SelectiveChoice:
    """Selective pruning's choice: the top fraction by score among the neurons still kept.

    Scores are recalculated through each step's mask, or (static mode, recalculate=False) collected
    once on the start mask; step i then takes the cumulative top i * frac of those fixed scores.
    """

    def __init__(
        self,
        cfg: PruneConfig,
        sites: ModelSites,
        measure: RunMeasure,
        start: NeuronMask,
        history: Sequence[StepReport],
    ) -> None:
        self.cfg, self.sites, self.measure, self.start = cfg, sites, measure, start
        self.static = not cfg.recalculate
        self.scores: Scores | None = None  # of the current mask (static: the start mask), reused by retries
        # Static mode: the fractions accepted so far, so the next step takes the cumulative top.
        accepted = [r for r in history if r.accepted and r.step > 0]
        self.static_done = (sum(r.ff_frac for r in accepted), sum(r.attn_frac for r in accepted))

    def choose(self, mask: NeuronMask, step: int, fracs: Fracs) -> Choice:
        if self.scores is None:  # once per step (static: once per run); a retry reuses them
            self.scores = self.measure.score(self.start if self.static else mask, step)
        scores = self.scores
        if self.static:
            # The cumulative top among the neurons the start mask keeps; the current mask then
            # filters, so a pruned neuron never returns.
            cumulative = (min(1.0, self.static_done[0] + fracs[0]), min(1.0, self.static_done[1] + fracs[1]))
            ff, attn = self._top(scores, self.start, cumulative)
            ff = Selection(ff.chosen & mask.ff_keep, ff.threshold)
            attn = Selection(attn.chosen & mask.attn_keep, attn.threshold)
        else:
            ff, attn = self._top(scores, mask, fracs)
        tokens, scores.tokens = scores.tokens, 0  # a retry reuses these statistics: count their tokens once
        return Choice(ff, attn, scores.offsets, tokens)

    def _top(self, scores: Scores, pool: NeuronMask, fracs: Fracs) -> tuple[Selection, Selection]:
        cfg = self.cfg
        per_layer = cfg.selection == "per_layer"
        ff = select_top_neurons(scores.ff, pool.ff_keep, fracs[0], per_layer=per_layer)
        if cfg.prune_heads:  # whole heads, by a per-head reduction of their neurons' scores
            attn = select_top_heads(
                scores.attn,
                pool.attn_keep,
                fracs[1],
                self.sites.n_heads,
                cfg.head_reduce,
                per_layer=per_layer,
            )
        else:
            attn = select_top_neurons(scores.attn, pool.attn_keep, fracs[1], per_layer=per_layer)
        return ff, attn

    def accepted(self, fracs: Fracs) -> None:
        """A step at `fracs` was kept: the next needs fresh scores (static: a larger cumulative top)."""
        self.static_done = (self.static_done[0] + fracs[0], self.static_done[1] + fracs[1])
        if not self.static:
            self.scores = None


class StepMode:
    """How a run takes its next step; `step` returns the report it made (None: the run stopped)."""

    def step(self, run: Run) -> StepReport | None:
        raise NotImplementedError

    def target_reached(self, last: StepReport) -> bool:
        """Whether the last report reached this mode's own goal (only a budget has one)."""
        return False


class FixedSteps(StepMode):
    """Selective steps at fixed fractions, each evaluated and kept."""

    def __init__(self, choice: SelectiveChoice, fracs: Fracs) -> None:
        self.choice, self.fracs = choice, fracs

    def step(self, run: Run) -> StepReport | None:
        started = time.monotonic()
        choice = self.choice.choose(run.mask, run.step_no, self.fracs)
        if choice.empty:  # no kept neuron has a finite score: nothing left to prune
            run.stop("exhausted")
            return None
        report = run.accept(choice.report(run.step_no, self.fracs, trial=0), choice.apply(run.mask), started)
        self.choice.accepted(self.fracs)
        return report


class BudgetedSteps(StepMode):
    """Selective steps under a retain budget, retried smaller until they fit.

    A trial that breaks the budget leaves the mask as it was; the retry uses `shrink` times the
    fraction. An accepted step keeps its fraction for the steps after it. The run ends at the budget
    floor: fractions under `min_frac_ratio` of the configured ones, or a retry too small for one neuron.
    """

    def __init__(
        self,
        choice: SelectiveChoice,
        budget: BudgetCheck,
        cfg: PruneConfig,
        fracs: Fracs,
        last: StepReport | None,
    ) -> None:
        self.choice, self.budget, self.cfg = choice, budget, cfg
        self.fracs, self.trial = fracs, 0
        if last is not None and last.step > 0 and not last.accepted:  # resumed between trials
            self._shrink(last.trial + 1)

    def step(self, run: Run) -> StepReport | None:
        started = time.monotonic()
        choice = self.choice.choose(run.mask, run.step_no, self.fracs)
        if choice.empty:  # a retry below one neuron: no smaller step can meet the budget
            run.stop("budget_floor" if self.trial > 0 else "exhausted")
            return None
        # Try the candidate on the budget sets before the run moves onto it.
        report = choice.report(run.step_no, self.fracs, self.trial)
        candidate = choice.apply(run.mask)
        report.budget = self.budget.measure(candidate, run.step_no)
        if not report.budget["broken"]:
            report = run.accept(report, candidate, started)
            self.choice.accepted(self.fracs)
            self.trial = 0
            return report
        # Broken: report the trial, stay on the mask and retry the step smaller.
        run.reject(report, started)
        self._shrink(self.trial + 1)
        if self._below_floor():
            run.stop("budget_floor")
        return report

    def _shrink(self, trial: int) -> None:
        shrink = self.budget.cfg.shrink
        self.fracs, self.trial = (self.fracs[0] * shrink, self.fracs[1] * shrink), trial

    def _below_floor(self) -> bool:
        ff, attn = self.fracs
        ratio = max(ff / max(self.cfg.ff_frac, 1e-12), attn / max(self.cfg.attn_frac, 1e-12))
        return ratio < self.budget.cfg.min_frac_ratio or not any(
            f > 0 and math.isfinite(f) for f in self.fracs
        )

    def target_reached(self, last: StepReport) -> bool:
        return last.accepted and self.budget.target_met(last.budget)


class RandomSteps(StepMode):
    """The random baseline: random kept neurons per layer (whole heads with prune_heads).

    As many in total as a selective step at the same fractions, spread evenly over layers, or exactly
    `counts[i]` per layer at step i + 1 (a selective run's, for a matched baseline).
    """

    def __init__(
        self,
        cfg: PruneConfig,
        sites: ModelSites,
        measure: RunMeasure,
        counts: Sequence[LayerCounts] | None,
        fracs: Fracs,
    ) -> None:
        self.cfg, self.sites, self.measure, self.counts, self.fracs = cfg, sites, measure, counts, fracs

    def step(self, run: Run) -> StepReport:
        started = time.monotonic()
        cfg, step, mask = self.cfg, run.step_no, run.mask
        # Mean ablation needs the retain means through the current mask; zeroing needs no statistics.
        offsets, tokens = None, 0
        if cfg.offset_mode == "retain_mean":
            offsets, tokens = self.measure.retain_means(mask, step)
        ff_counts, attn_counts = self.counts[step - 1] if self.counts is not None else (None, None)
        group = self.sites.d_head if cfg.prune_heads else 1
        ff = select_random_per_layer(
            mask.ff_keep, self.fracs[0], selection_seed(cfg.seed, step, 2), counts=ff_counts
        )
        attn = select_random_per_layer(
            mask.attn_keep, self.fracs[1], selection_seed(cfg.seed, step, 3), group=group, counts=attn_counts
        )
        choice = Choice(ff, attn, offsets, tokens)
        return run.accept(choice.report(step, self.fracs, trial=0), choice.apply(mask), started)


def make_mode(
    cfg: PruneConfig,
    sites: ModelSites,
    measure: RunMeasure,
    budget: BudgetCheck | None,
    start: NeuronMask,
    history: Sequence[StepReport],
    random_counts: Sequence[LayerCounts] | None,
) -> StepMode:
    """The mode `cfg` asks for, picking up where `history` (of a resumed run) stopped."""
    fracs = (cfg.ff_frac, cfg.attn_frac)
    if history and history[-1].step > 0:  # resumed: continue at the fractions the run stood at
        fracs = (history[-1].ff_frac, history[-1].attn_frac)
    if cfg.random_baseline:
        return RandomSteps(cfg, sites, measure, random_counts, fracs)
    choice = SelectiveChoice(cfg, sites, measure, start, history)
    if budget is not None:
        return BudgetedSteps(choice, budget, cfg, fracs, history[-1] if history else None)
    return FixedSteps(choice, fracs)
