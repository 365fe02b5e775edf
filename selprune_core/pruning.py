"""Iterative selective pruning (method.md §5), with an optional retain budget.

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

The loop reports through callbacks (progress inside a step, a report after each trial) and checks a
cancellation callback between phases, so the caller can persist every step and resume from it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune_core.activations import ActivationStats, collect_activations
from selprune_core.batching import iter_packed_batches, iter_token_batches
from selprune_core.budget import BudgetCheck
from selprune_core.config import EvalConfig, PruneConfig
from selprune_core.errors import CancelledError, ConfigError
from selprune_core.evaluation import EvalResult, common_target_ids, evaluate_sets, relative_drop
from selprune_core.masks import NeuronMask, apply_mask
from selprune_core.reports import Progress, PruneResult, StepReport
from selprune_core.scoring import (
    OUTPUT_AWARE,
    Selection,
    required_fields,
    score_neurons,
    select_random_per_layer,
    select_top_heads,
    select_top_neurons,
)
from selprune_core.sites import ModelSites

__all__ = ["StepReport", "PruneResult", "Progress", "prune_iteratively"]

log = logging.getLogger(__name__)


@dataclass
class _Proposal:
    """What one step's statistics give: scores to select from, and mean-ablation values."""

    scores: tuple[torch.Tensor, torch.Tensor] | None  # FF [layer, d_mlp], attention [layer, d_attn]
    offsets: tuple[torch.Tensor, torch.Tensor] | None  # retain means, same shapes
    tokens: int


def _selection_seed(seed: int, step: int, component: int) -> torch.Generator:
    # One generator per (step, component) so a resumed run draws what an uninterrupted one would.
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7 + component)


class _Run:
    """State of one pruning run; `prune_iteratively` is its public face."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        sites: ModelSites,
        fingerprint: str,
        cfg: PruneConfig,
        eval_sets: Mapping[str, Sequence[str]],
        on_progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
        extra_metrics: Callable[[NeuronMask], dict[str, Any]] | None,
    ) -> None:
        self.model, self.tokenizer, self.sites, self.fingerprint = model, tokenizer, sites, fingerprint
        self.cfg, self.eval_sets = cfg, eval_sets
        self.on_progress, self.should_stop, self.extra_metrics = on_progress, should_stop, extra_metrics
        self.device = next(model.parameters()).device
        self.common_ids = self.common_ids_of(eval_sets)
        needs_norms = {cfg.ff_scoring, cfg.attn_scoring} & OUTPUT_AWARE
        self.out_norms = sites.output_norms() if needs_norms else (None, None)

    def common_ids_of(self, sets: Mapping[str, Sequence[str]]) -> tuple[int, ...]:
        if self.cfg.eval.skip_common <= 0 or not sets:
            return ()
        union = [text for texts in sets.values() for text in texts]
        ids = common_target_ids(
            self.tokenizer, union, n=self.cfg.eval.skip_common, token_limit=self.cfg.eval.token_limit
        )
        return ids

    def report(self, step: int, phase: str, tokens: int = 0) -> None:
        if self.should_stop is not None and self.should_stop():
            raise CancelledError(f"cancelled at step {step} ({phase})")
        if self.on_progress is not None:
            self.on_progress(Progress(step, phase, tokens))

    # Statistics and scores -------------------------------------------------------------------
    def collect(
        self, texts: Sequence[str], mask: NeuronMask, step: int, phase: str, which: tuple[str, ...]
    ) -> ActivationStats:
        cfg = self.cfg.collect
        if cfg.pack:
            batches = iter_packed_batches(
                self.tokenizer,
                texts,
                token_limit=cfg.token_limit,
                window=cfg.token_limit,
                batch_size=cfg.batch_size,
                device=self.device,
            )
        else:
            batches = iter_token_batches(
                self.tokenizer,
                texts,
                token_limit=cfg.token_limit,
                batch_size=cfg.batch_size,
                device=self.device,
            )
        self.report(step, phase)
        with apply_mask(self.model, self.sites, mask):
            return collect_activations(
                self.model,
                self.sites,
                batches,
                sample_tokens=cfg.sample_tokens,
                skip_first=cfg.skip_first,
                which=which,
                on_batch=lambda tokens: self.report(step, phase, tokens),
            )

    def propose(self, forget: Sequence[str], retain: Sequence[str], mask: NeuronMask, step: int) -> _Proposal:
        """Collect statistics through `mask` and score every neuron (random baseline: means only)."""
        cfg = self.cfg
        mean_ablation = cfg.offset_mode == "retain_mean"
        if cfg.random_baseline:
            if not mean_ablation:
                return _Proposal(None, None, 0)
            retain_stats = self.collect(retain, mask, step, "collecting_retain", ("sum",))
            return _Proposal(None, (retain_stats.ff.mean, retain_stats.attn.mean), retain_stats.n_tokens)
        which = required_fields(cfg.ff_scoring, cfg.attn_scoring)
        retain_which = tuple(sorted(set(which) | {"sum"})) if mean_ablation else which
        retain_stats = self.collect(retain, mask, step, "collecting_retain", retain_which)
        forget_stats = self.collect(forget, mask, step, "collecting_forget", which)
        self.report(step, "scoring")
        ff_norm, attn_norm = self.out_norms
        sites = self.sites
        ff = score_neurons(
            cfg.ff_scoring,
            forget_stats.ff,
            retain_stats.ff,
            cfg.ff_eps,
            shape=(sites.n_layers, sites.d_mlp),
            generator=_selection_seed(cfg.seed, step, 0),
            out_norm=ff_norm,
        )
        attn = score_neurons(
            cfg.attn_scoring,
            forget_stats.attn,
            retain_stats.attn,
            cfg.attn_eps,
            shape=(sites.n_layers, sites.d_attn),
            generator=_selection_seed(cfg.seed, step, 1),
            out_norm=attn_norm,
        )
        offsets = (retain_stats.ff.mean, retain_stats.attn.mean) if mean_ablation else None
        return _Proposal((ff, attn), offsets, retain_stats.n_tokens + forget_stats.n_tokens)

    def select(
        self,
        mask: NeuronMask,
        step: int,
        proposal: _Proposal,
        fracs: tuple[float, float],
        counts: tuple[list[int], list[int]] | None,
        static_base: NeuronMask | None = None,
    ) -> tuple[Selection, Selection]:
        """Choose FF and attention neurons among those `mask` keeps, at the given (ff, attn) fractions.

        In static mode `static_base` is the start mask and `fracs` are cumulative fractions of it.
        """
        cfg, sites = self.cfg, self.sites
        ff_frac, attn_frac = fracs
        per_layer = cfg.selection == "per_layer"
        if cfg.random_baseline:
            group = sites.d_head if cfg.prune_heads else 1
            ff = select_random_per_layer(
                mask.ff_keep,
                ff_frac,
                _selection_seed(cfg.seed, step, 2),
                counts=counts[0] if counts else None,
            )
            attn = select_random_per_layer(
                mask.attn_keep,
                attn_frac,
                _selection_seed(cfg.seed, step, 3),
                group=group,
                counts=counts[1] if counts else None,
            )
            return ff, attn
        assert proposal.scores is not None
        ff_scores, attn_scores = proposal.scores
        # Static mode selects the cumulative top fraction of fixed scores among the neurons the start
        # mask keeps; the current mask then filters, so a pruned neuron never returns.
        pool = static_base if static_base is not None else mask
        ff = select_top_neurons(ff_scores, pool.ff_keep, ff_frac, per_layer=per_layer)
        if cfg.prune_heads:
            attn = select_top_heads(
                attn_scores, pool.attn_keep, attn_frac, sites.n_heads, cfg.head_reduce, per_layer=per_layer
            )
        else:
            attn = select_top_neurons(attn_scores, pool.attn_keep, attn_frac, per_layer=per_layer)
        if static_base is not None:
            ff = Selection(ff.chosen & mask.ff_keep, ff.threshold)
            attn = Selection(attn.chosen & mask.attn_keep, attn.threshold)
        return ff, attn

    # Evaluation ------------------------------------------------------------------------------
    def evaluate(
        self,
        mask: NeuronMask,
        step: int,
        sets: Mapping[str, Sequence[str]],
        eval_cfg: EvalConfig,
        common_ids: Sequence[int],
        *,
        phase: str = "evaluating",
        extra: bool = True,
    ) -> tuple[dict[str, EvalResult], dict[str, Any]]:
        self.report(step, phase)
        with apply_mask(self.model, self.sites, mask):
            results = evaluate_sets(self.model, self.tokenizer, sets, eval_cfg, common_ids=common_ids)
        metrics = self.extra_metrics(mask) if extra and self.extra_metrics is not None else {}
        return results, metrics


def _stop_reason(cfg: PruneConfig, report: StepReport, forget_eval: str, retain_eval: str) -> str | None:
    if cfg.stop is None:
        return None
    forget_drop, retain_drop = report.drops.get(forget_eval), report.drops.get(retain_eval)
    if (
        cfg.stop.max_retain_drop is not None
        and retain_drop is not None
        and retain_drop > cfg.stop.max_retain_drop
    ):
        return "max_retain_drop"
    if cfg.stop.forget_drop is not None and forget_drop is not None and forget_drop >= cfg.stop.forget_drop:
        return "forget_drop"
    return None


def _check_inputs(
    cfg: PruneConfig,
    eval_sets: Mapping[str, Sequence[str]],
    budget_sets: Mapping[str, Sequence[str]],
    forget_eval: str,
    retain_eval: str,
    random_counts: Sequence[tuple[list[int], list[int]]] | None,
) -> None:
    """Fail before any work on settings that could only fail later."""
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
    if random_counts is not None and not cfg.random_baseline:
        raise ConfigError("random_counts is for the random baseline only")


@torch.no_grad()
def prune_iteratively(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sites: ModelSites,
    fingerprint: str,
    forget: Sequence[str],
    retain: Sequence[str],
    eval_sets: Mapping[str, Sequence[str]],
    cfg: PruneConfig,
    *,
    forget_eval: str = "forget",
    retain_eval: str = "retain",
    budget_sets: Mapping[str, Sequence[str]] | None = None,
    random_counts: Sequence[tuple[list[int], list[int]]] | None = None,
    start_mask: NeuronMask | None = None,
    history: Sequence[StepReport] = (),
    resume_mask: NeuronMask | None = None,
    on_step: Callable[[StepReport, NeuronMask], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    extra_metrics: Callable[[NeuronMask], dict[str, Any]] | None = None,
) -> PruneResult:
    """Prune `model`'s neurons specific to `forget` texts, keeping those used on `retain` texts.

    `budget_sets` ({forget_eval: texts, retain_eval: texts}, a validation split) is what a budget is
    checked on; it defaults to `eval_sets`. `random_counts[i]` gives the random baseline's per-layer
    (FF, attention) counts for step i + 1, e.g. a selective run's `ff_per_layer`/`attn_per_layer`.
    `start_mask` is the mask the run starts from (default: keep everything). To resume an
    interrupted run, pass the completed `history` and the mask after its last accepted step as
    `resume_mask`; the run continues where it stopped and draws exactly what it would have.
    `on_step` is called after every step and trial (including step 0) with the report and the mask
    the run now stands on. Raises CancelledError when `should_stop()` turns true.
    """
    model.eval()
    budget_sets = eval_sets if budget_sets is None else budget_sets
    _check_inputs(cfg, eval_sets, budget_sets, forget_eval, retain_eval, random_counts)
    run = _Run(model, tokenizer, sites, fingerprint, cfg, eval_sets, on_progress, should_stop, extra_metrics)
    budget = None
    if cfg.budget is not None:
        # No bootstrap: the budget reads point estimates, and resampling would add to every trial.
        budget_eval = EvalConfig(**{**asdict(cfg.eval), "bootstrap_samples": 0})
        budget_common = run.common_ids_of(budget_sets)

        def evaluate_budget(mask: NeuronMask, step: int) -> dict[str, EvalResult]:
            results, _ = run.evaluate(
                mask, step, budget_sets, budget_eval, budget_common, phase="checking_budget", extra=False
            )
            return results

        budget = BudgetCheck(cfg.budget, evaluate_budget, forget_eval=forget_eval, retain_eval=retain_eval)
    initial = start_mask if start_mask is not None else NeuronMask.full(sites, fingerprint)
    initial.check_fits(sites, fingerprint)
    mask = resume_mask if resume_mask is not None else initial
    done: list[StepReport] = list(history)
    baseline_top1: dict[str, float] = {}

    def record(report: StepReport, results: Mapping[str, EvalResult], extra: dict[str, Any]) -> None:
        report.metrics = {name: result.as_dict() for name, result in results.items()}
        report.drops = {
            name: relative_drop(baseline_top1[name], r.top1)
            for name, r in results.items()
            if name in baseline_top1
        }
        report.extra = extra

    def finish(report: StepReport, started: float) -> None:
        report.seconds = time.monotonic() - started
        report.mask_id = mask.mask_id
        done.append(report)
        counts = mask.pruned_counts()
        log.info(
            "step %d/%d%s: pruned ff %d (+%d), attn %d (+%d) at fractions %.4g/%.4g; drops %s; budget %s",
            report.step,
            cfg.n_steps,
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
        if on_step is not None:
            on_step(report, mask)

    if done:
        baseline_top1.update({name: m["top1"] for name, m in done[0].metrics.items()})
    elif cfg.run_pre_test or budget is not None:
        started = time.monotonic()
        results, extra = run.evaluate(mask, 0, eval_sets, cfg.eval, run.common_ids)
        baseline_top1.update({name: result.top1 for name, result in results.items()})
        counts = mask.pruned_counts()
        report = StepReport(step=0, ff_pruned=counts["ff"], attn_pruned=counts["attn"])
        record(report, results, extra)
        if budget is not None:
            report.budget = budget.measure(mask, 0)
        finish(report, started)
    if budget is not None and not budget.base:  # resumed: re-measure the baseline of the budget sets
        budget.measure(initial, 0)

    fracs = (cfg.ff_frac, cfg.attn_frac)
    accepted_steps = [r.step for r in done if r.accepted]
    step = max(accepted_steps, default=0) + 1
    trial = 0
    if done and done[-1].step > 0:  # resumed: continue at the fractions and trial where the run stood
        last = done[-1]
        fracs = (last.ff_frac, last.attn_frac)
        if not last.accepted:
            assert cfg.budget is not None
            fracs = (fracs[0] * cfg.budget.shrink, fracs[1] * cfg.budget.shrink)
            trial = last.trial + 1
    proposal: _Proposal | None = None  # statistics of the current mask, reused by retries
    static: _Proposal | None = None
    # Static mode: the fractions accepted so far, so step i takes the cumulative top of fixed scores.
    accepted = [r for r in done if r.accepted and r.step > 0]
    static_done = (sum(r.ff_frac for r in accepted), sum(r.attn_frac for r in accepted))
    n_steps = cfg.n_steps if random_counts is None else min(cfg.n_steps, len(random_counts))
    while step <= n_steps:
        if done and (reason := _stop_reason(cfg, done[-1], forget_eval, retain_eval)):
            return PruneResult(mask, done, reason)
        if budget is not None and done and done[-1].accepted and budget.target_met(done[-1].budget):
            return PruneResult(mask, done, "forget_target")
        started = time.monotonic()
        if proposal is None:
            if cfg.recalculate or cfg.random_baseline:
                proposal = run.propose(forget, retain, mask, step)
            elif static is None:  # static: the starting model's scores, collected once
                static = proposal = run.propose(forget, retain, initial, step)
            else:
                proposal = _Proposal(static.scores, static.offsets, 0)
        layer_counts = random_counts[step - 1] if random_counts is not None else None
        if static is not None:
            cumulative = (min(1.0, static_done[0] + fracs[0]), min(1.0, static_done[1] + fracs[1]))
            ff_sel, attn_sel = run.select(mask, step, proposal, cumulative, None, static_base=initial)
        else:
            ff_sel, attn_sel = run.select(mask, step, proposal, fracs, layer_counts)
        if ff_sel.count == 0 and attn_sel.count == 0 and not cfg.random_baseline:
            if trial > 0:  # shrunk below one neuron: the budget cannot be met with another step
                return PruneResult(mask, done, "budget_floor")
            return PruneResult(mask, done, "exhausted")
        offsets = proposal.offsets
        candidate = mask.prune(
            ff_sel.chosen,
            attn_sel.chosen,
            ff_values=offsets[0] if offsets else None,
            attn_values=offsets[1] if offsets else None,
        )
        report = StepReport(
            step=step,
            ff_selected=ff_sel.count,
            attn_selected=attn_sel.count,
            ff_threshold=ff_sel.threshold,
            attn_threshold=attn_sel.threshold,
            ff_per_layer=ff_sel.per_layer(),
            attn_per_layer=attn_sel.per_layer(),
            tokens_collected=proposal.tokens,
            ff_frac=fracs[0],
            attn_frac=fracs[1],
            trial=trial,
        )
        proposal.tokens = 0  # a retry reuses these statistics: count their tokens once
        if budget is not None:
            report.budget = budget.measure(candidate, step)
            if report.budget["broken"]:
                report.accepted = False
                counts_now = mask.pruned_counts()
                report.ff_pruned, report.attn_pruned = counts_now["ff"], counts_now["attn"]
                finish(report, started)
                fracs = (fracs[0] * budget.cfg.shrink, fracs[1] * budget.cfg.shrink)
                trial += 1
                if max(fracs[0] / max(cfg.ff_frac, 1e-12), fracs[1] / max(cfg.attn_frac, 1e-12)) < (
                    budget.cfg.min_frac_ratio
                ) or not any(f > 0 and math.isfinite(f) for f in fracs):
                    return PruneResult(mask, done, "budget_floor")
                continue
        mask = candidate
        results, extra = run.evaluate(mask, step, eval_sets, cfg.eval, run.common_ids)
        record(report, results, extra)
        counts_now = mask.pruned_counts()
        report.ff_pruned, report.attn_pruned = counts_now["ff"], counts_now["attn"]
        finish(report, started)
        static_done = (static_done[0] + fracs[0], static_done[1] + fracs[1])
        proposal, trial, step = (proposal if static is not None else None), 0, step + 1
    if budget is not None and done and done[-1].accepted and budget.target_met(done[-1].budget):
        return PruneResult(mask, done, "forget_target")
    reason = _stop_reason(cfg, done[-1], forget_eval, retain_eval) if done else None
    return PruneResult(mask, done, reason or "steps")
