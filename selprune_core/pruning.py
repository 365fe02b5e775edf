"""Iterative selective pruning (docs/method.md §5), with an optional retain budget.

    step 0: evaluate the unpruned model (run_pre_test)
    step i: collect statistics on retain and forget texts *through the current mask*,
            score FF and attention neurons, prune the top fraction of each, evaluate.

Pruned neurons are never candidates again, so each step adds about frac * N new neurons and after
i steps about i * frac of the component is gone. Static mode (recalculate=False) collects once and
takes the next top fraction of those fixed scores each step. The random baseline draws random
neurons per layer, at the same total as a selective step or at given per-layer counts.

Under a budget (`PruneConfig.budget`) every step is *tried* first: the candidate mask is evaluated on
the budget sets (a validation split, not the held-out sets) and rejected when it breaks the budget;
the step is then retried from the last accepted mask at a smaller fraction. Every trial is reported,
accepted or not.

Under mean ablation (`offset_mode="retain_mean"`) a newly pruned neuron outputs its mean activation
on the retain texts, measured through the mask of the step that prunes it, instead of 0.

A run is a PruneRun: its constructor checks every setting, then each `step()` adds one report (step
0, a pruning step, or one trial of a budgeted step) until `done`. The constructor reads a causal LM
on texts; `PruneRun.with_measure` runs the same loop on anything else a RunMeasure can read (an image
classifier on images: image_measure.py). How a step is taken depends on the
mode (prune_modes.py); what it reads off the model is in prune_measure.py. `prune_iteratively` runs
one to the end. The run reports through callbacks (progress inside a step, a report after each trial)
and checks a cancellation callback between phases, so the caller can persist every step and resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selprune_core.budget import BudgetCheck
from selprune_core.config import PruneConfig
from selprune_core.errors import ConfigError
from selprune_core.evaluation import EvalResult, relative_drop
from selprune_core.loading import LoadedModel
from selprune_core.masks import NeuronMask
from selprune_core.prune_measure import Measure, PrunableModel, PruneCallbacks, RunMeasure
from selprune_core.prune_modes import LayerCounts, make_mode
from selprune_core.reports import Progress, PruneResult, StepReport

__all__ = [
    "Progress",
    "PruneCallbacks",
    "PruneOptions",
    "PruneResult",
    "PruneRun",
    "StepReport",
    "prune_iteratively",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneOptions:
    """What a run starts from and reads besides its texts and config; every field is optional."""

    forget_eval: str = "forget"  # the eval (and budget) set names the stop rules and the budget read
    retain_eval: str = "retain"
    # {forget_eval: texts, retain_eval: texts}, a validation split the budget reads (default: eval sets)
    budget_sets: Mapping[str, Sequence[str]] | None = None
    # Random baseline: [i] is the per-layer (FF, attention) counts of step i + 1, e.g. a selective
    # run's ff_per_layer/attn_per_layer; the run takes at most len(random_counts) steps.
    random_counts: Sequence[LayerCounts] | None = None
    start_mask: NeuronMask | None = None  # the mask the run starts from (default: keep everything)
    # Resuming: the reports of the interrupted run and the mask after its last accepted step.
    history: Sequence[StepReport] = ()
    resume_mask: NeuronMask | None = None


class PruneRun:
    """One pruning run, one report per `step()`; `run_to_end()` steps it until `done`.

    Its state is the mask it stands on (`mask`), every report so far (`history`), the number of the
    next step (`step_no`) and, once done, `result`.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        forget: Sequence[str],
        retain: Sequence[str],
        eval_sets: Mapping[str, Sequence[str]],
        cfg: PruneConfig,
        options: PruneOptions | None = None,
        callbacks: PruneCallbacks | None = None,
    ) -> None:
        options = options if options is not None else PruneOptions()
        callbacks = callbacks if callbacks is not None else PruneCallbacks()
        # Check everything first, so a bad setting fails before any collection or evaluation.
        budget_sets = eval_sets if options.budget_sets is None else options.budget_sets
        _check_inputs(loaded, cfg, eval_sets, budget_sets, options)
        measure = Measure(loaded, cfg, (forget, retain), eval_sets, budget_sets, callbacks)
        self._setup(loaded, measure, cfg, options, callbacks)

    @classmethod
    def with_measure(
        cls,
        target: PrunableModel,
        measure: RunMeasure,
        eval_names: Collection[str],
        cfg: PruneConfig,
        options: PruneOptions | None = None,
        callbacks: PruneCallbacks | None = None,
    ) -> PruneRun:
        """A run on `target` that reads it through `measure`, whose evaluations name `eval_names`.

        `options.budget_sets` only names the budget sets here (their data is the measure's). Give the
        measure the same `callbacks`, so its progress and cancellation reach the caller too.
        """
        options = options if options is not None else PruneOptions()
        callbacks = callbacks if callbacks is not None else PruneCallbacks()
        budget_names = eval_names if options.budget_sets is None else options.budget_sets
        _check_inputs(target, cfg, eval_names, budget_names, options)
        run = cls.__new__(cls)
        run._setup(target, measure, cfg, options, callbacks)
        return run

    def _setup(
        self,
        loaded: PrunableModel,
        measure: RunMeasure,
        cfg: PruneConfig,
        options: PruneOptions,
        callbacks: PruneCallbacks,
    ) -> None:
        self.loaded, self.cfg, self.options, self.callbacks = loaded, cfg, options, callbacks
        self.measure = measure
        self.budget = None
        if cfg.budget is not None:
            self.budget = BudgetCheck(
                cfg.budget,
                self.measure.evaluate_budget,
                forget_eval=options.forget_eval,
                retain_eval=options.retain_eval,
            )
        # Where the run stands: a fresh run on its start mask at step 1, a resumed one after its
        # last accepted step.
        start = options.start_mask
        self.start = start if start is not None else NeuronMask.full(loaded.sites, loaded.fingerprint)
        self.mask = options.resume_mask if options.resume_mask is not None else self.start
        self.history = list(options.history)
        self.step_no = max((r.step for r in self.history if r.accepted), default=0) + 1
        counts = options.random_counts
        self.n_steps = cfg.n_steps if counts is None else min(cfg.n_steps, len(counts))
        # Drops are relative to the first report's top-1 (a resumed run's is in its history).
        self.baseline_top1 = (
            {name: m["top1"] for name, m in self.history[0].metrics.items()} if self.history else {}
        )
        self.mode = make_mode(cfg, loaded.sites, self.measure, self.budget, self.start, self.history, counts)
        self.result: PruneResult | None = None
        self._started = False
        model: nn.Module = loaded.model  # eval mode: no dropout while collecting and evaluating
        model.eval()

    @property
    def done(self) -> bool:
        return self.result is not None

    @torch.no_grad()
    def step(self) -> StepReport | None:
        """Add the next report: step 0, a pruning step, or one trial of a budgeted step.

        Returns it, or None when the run stopped instead (`done` is then true).
        """
        assert self.result is None, "the run is done"
        if not self._started:
            self._started = True
            if (report := self._step_zero()) is not None:
                return report
        if reason := self._stop_reason():
            self.stop(reason)
            return None
        return self.mode.step(self)

    def run_to_end(self) -> PruneResult:
        while self.result is None:
            self.step()
        return self.result

    # Phases ----------------------------------------------------------------------------------
    def _step_zero(self) -> StepReport | None:
        """Evaluate the unpruned model: the baseline every drop (and the budget) is relative to."""
        if self.history:  # resumed: step 0 is in the history, but the budget measures its own baseline
            if self.budget is not None:
                self.budget.measure(self.start, 0)
            return None
        if not self.cfg.run_pre_test and self.budget is None:
            return None
        started = time.monotonic()
        results, extra = self.measure.evaluate(self.mask, 0)
        self.baseline_top1 = {name: result.top1 for name, result in results.items()}
        report = StepReport(step=0)
        self._record(report, results, extra)
        if self.budget is not None:
            report.budget = self.budget.measure(self.mask, 0)
        return self._emit(report, started)

    def _stop_reason(self) -> str | None:
        """Why the run ends before its next step: a stop rule, the budget's target, or no steps left."""
        last = self.history[-1] if self.history else None
        rule = _stop_rule(self.cfg, last, self.options) if last is not None else None
        target = "forget_target" if last is not None and self.mode.target_reached(last) else None
        if self.step_no <= self.n_steps:
            return rule or target
        return target or rule or "steps"

    # What a mode calls -----------------------------------------------------------------------
    def accept(self, report: StepReport, candidate: NeuronMask, started: float) -> StepReport:
        """Move onto `candidate`, evaluate it, report the step and go on to the next."""
        self.mask = candidate
        results, extra = self.measure.evaluate(candidate, report.step)
        self._record(report, results, extra)
        self._emit(report, started)
        self.step_no += 1
        return report

    def reject(self, report: StepReport, started: float) -> StepReport:
        """Report a trial that broke the budget; the run stays on its mask."""
        report.accepted = False
        return self._emit(report, started)

    def stop(self, reason: str) -> None:
        self.result = PruneResult(self.mask, self.history, reason)

    # Reports ---------------------------------------------------------------------------------
    def _record(self, report: StepReport, results: Mapping[str, EvalResult], extra: dict[str, Any]) -> None:
        report.metrics = {name: result.as_dict() for name, result in results.items()}
        report.drops = {
            name: relative_drop(self.baseline_top1[name], r.top1)
            for name, r in results.items()
            if name in self.baseline_top1
        }
        report.extra = extra

    def _emit(self, report: StepReport, started: float) -> StepReport:
        """Complete `report` with the mask the run stands on, keep it, log it, hand it to the caller."""
        counts = self.mask.pruned_counts()
        report.ff_pruned, report.attn_pruned = counts["ff"], counts["attn"]
        report.seconds = time.monotonic() - started
        report.mask_id = self.mask.mask_id
        self.history.append(report)
        log.info(
            "step %d/%d%s: pruned ff %d (+%d), attn %d (+%d) at fractions %.4g/%.4g; drops %s; budget %s",
            report.step,
            self.cfg.n_steps,
            "" if report.accepted else f" (trial {report.trial} rejected)",
            counts["ff"],
            report.ff_selected,
            counts["attn"],
            report.attn_selected,
            report.ff_frac,
            report.attn_frac,
            {k: round(v, 4) for k, v in report.drops.items()},
            {k: v for k, v in report.budget.items() if k in ("forget_drop", "retain_drop", "broken")},
        )
        if self.callbacks.on_step is not None:
            self.callbacks.on_step(report, self.mask)
        return report


def _stop_rule(cfg: PruneConfig, report: StepReport, options: PruneOptions) -> str | None:
    """The stop rule (`cfg.stop`) `report` meets, if any."""
    if cfg.stop is None:
        return None
    forget_drop, retain_drop = report.drops.get(options.forget_eval), report.drops.get(options.retain_eval)
    max_retain = cfg.stop.max_retain_drop
    if max_retain is not None and retain_drop is not None and retain_drop > max_retain:
        return "max_retain_drop"
    if cfg.stop.forget_drop is not None and forget_drop is not None and forget_drop >= cfg.stop.forget_drop:
        return "forget_drop"
    return None


def _check_inputs(
    loaded: PrunableModel,
    cfg: PruneConfig,
    eval_sets: Collection[str],
    budget_sets: Collection[str],
    options: PruneOptions,
) -> None:
    """Fail before any work on settings and inputs that could only fail later (sets: their names)."""
    forget_eval, retain_eval = options.forget_eval, options.retain_eval
    if stop := cfg.stop:
        if stop.forget_drop is not None and forget_eval not in eval_sets:
            raise ConfigError(f"stop.forget_drop needs an eval set named {forget_eval!r}")
        if stop.max_retain_drop is not None and retain_eval not in eval_sets:
            raise ConfigError(f"stop.max_retain_drop needs an eval set named {retain_eval!r}")
    if cfg.budget is not None:
        missing = BudgetCheck.sets_missing(budget_sets, forget_eval, retain_eval)
        if missing:
            raise ConfigError(f"a budget needs budget sets named {sorted(missing)}")
        if cfg.random_baseline:
            raise ConfigError("a budget adapts the step size; the random baseline follows fixed counts")
    if options.random_counts is not None:
        if not cfg.random_baseline:
            raise ConfigError("random_counts is for the random baseline only")
        layers = loaded.sites.n_layers
        if any(len(ff) != layers or len(attn) != layers for ff, attn in options.random_counts):
            raise ConfigError(f"random_counts needs (FF, attention) counts for each of {layers} layers")
    history = options.history
    if history and not history[-1].accepted and cfg.budget is None:
        raise ConfigError("the history ends in a rejected trial, which only a budgeted run can resume")
    for mask in (options.start_mask, options.resume_mask):
        if mask is not None:
            mask.check_fits(loaded.sites, loaded.fingerprint)


@torch.no_grad()
def prune_iteratively(
    loaded: LoadedModel,
    forget: Sequence[str],
    retain: Sequence[str],
    eval_sets: Mapping[str, Sequence[str]],
    cfg: PruneConfig,
    *,
    forget_eval: str = "forget",
    retain_eval: str = "retain",
    budget_sets: Mapping[str, Sequence[str]] | None = None,
    random_counts: Sequence[LayerCounts] | None = None,
    start_mask: NeuronMask | None = None,
    history: Sequence[StepReport] = (),
    resume_mask: NeuronMask | None = None,
    on_step: Callable[[StepReport, NeuronMask], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    extra_metrics: Callable[[NeuronMask], dict[str, Any]] | None = None,
) -> PruneResult:
    """Prune the neurons of `loaded` specific to `forget` texts, keeping those used on `retain` texts.

    `budget_sets` ({forget_eval: texts, retain_eval: texts}, a validation split) is what a budget is
    checked on; it defaults to `eval_sets`. `random_counts[i]` gives the random baseline's per-layer
    (FF, attention) counts for step i + 1, e.g. a selective run's `ff_per_layer`/`attn_per_layer`.
    `start_mask` is the mask the run starts from (default: keep everything). To resume an
    interrupted run, pass the completed `history` and the mask after its last accepted step as
    `resume_mask`; the run continues where it stopped and draws exactly what it would have.
    `on_step` is called after every step and trial (including step 0) with the report and the mask
    the run now stands on. Raises CancelledError when `should_stop()` turns true, and ConfigError (or
    MaskMismatchError) before any work for settings that cannot run.
    """
    options = PruneOptions(
        forget_eval=forget_eval,
        retain_eval=retain_eval,
        budget_sets=budget_sets,
        random_counts=random_counts,
        start_mask=start_mask,
        history=history,
        resume_mask=resume_mask,
    )
    callbacks = PruneCallbacks(
        on_step=on_step, on_progress=on_progress, should_stop=should_stop, extra_metrics=extra_metrics
    )
    return PruneRun(loaded, forget, retain, eval_sets, cfg, options, callbacks).run_to_end()
