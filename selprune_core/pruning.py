"""Iterative selective pruning (method.md §5).

    step 0: evaluate the unpruned model (run_pre_test)
    step i: collect statistics on retain and forget texts *through the current mask*,
            score FF and attention neurons, prune the global top fraction of each, evaluate.

Pruned neurons read 0 in later collections, so each step adds about frac * N new neurons and after
i steps about i * frac of the component is gone. Static mode (recalculate=False) collects once and
prunes the cumulative top min(1, frac * i) by those fixed scores. The random baseline draws per-layer
random neurons at the same fractions, with no statistics.

The loop reports through callbacks (progress inside a step, a report after each step) and checks a
cancellation callback between phases, so the caller can persist every step and resume from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune_core.activations import ActivationStats, collect_activations
from selprune_core.batching import iter_token_batches
from selprune_core.config import PruneConfig
from selprune_core.errors import CancelledError, ConfigError
from selprune_core.evaluation import EvalResult, common_target_ids, evaluate_sets, relative_drop
from selprune_core.masks import NeuronMask, apply_mask
from selprune_core.scoring import (
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
class StepReport:
    """What one step did and measured; step 0 is the unpruned baseline."""

    step: int
    ff_selected: int = 0  # neurons newly pruned this step
    attn_selected: int = 0
    ff_threshold: float | None = None  # lowest selected score (None: nothing selected or random)
    attn_threshold: float | None = None
    ff_pruned: int = 0  # cumulative
    attn_pruned: int = 0
    ff_per_layer: list[int] = field(default_factory=list)  # newly pruned per layer
    attn_per_layer: list[int] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval set -> EvalResult.as_dict()
    drops: dict[str, float] = field(default_factory=dict)  # eval set -> relative top-1 drop vs step 0
    extra: dict[str, Any] = field(default_factory=dict)  # extra metrics (e.g. toxicity)
    tokens_collected: int = 0
    seconds: float = 0.0
    mask_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepReport:
        return cls(**dict(data))


@dataclass
class PruneResult:
    mask: NeuronMask
    history: list[StepReport]
    stopped_reason: str  # "steps", "forget_drop", "max_retain_drop", "exhausted"


@dataclass(frozen=True)
class Progress:
    """Inside-a-step progress: which phase, and tokens counted so far in it."""

    step: int
    phase: str  # "evaluating", "collecting_retain", "collecting_forget", "scoring"
    tokens: int = 0


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
        forget: Sequence[str],
        retain: Sequence[str],
        eval_sets: Mapping[str, Sequence[str]],
        cfg: PruneConfig,
        on_progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
        extra_metrics: Callable[[NeuronMask], dict[str, Any]] | None,
    ) -> None:
        self.model, self.tokenizer, self.sites, self.fingerprint = model, tokenizer, sites, fingerprint
        self.forget, self.retain, self.eval_sets, self.cfg = forget, retain, eval_sets, cfg
        self.on_progress, self.should_stop, self.extra_metrics = on_progress, should_stop, extra_metrics
        self.device = next(model.parameters()).device
        self.common_ids: tuple[int, ...] = ()
        if cfg.eval.skip_common > 0 and eval_sets:
            union = [text for texts in eval_sets.values() for text in texts]
            self.common_ids = common_target_ids(
                tokenizer, union, n=cfg.eval.skip_common, token_limit=cfg.eval.token_limit
            )

    def report(self, step: int, phase: str, tokens: int = 0) -> None:
        if self.should_stop is not None and self.should_stop():
            raise CancelledError(f"cancelled at step {step} ({phase})")
        if self.on_progress is not None:
            self.on_progress(Progress(step, phase, tokens))

    def collect(self, texts: Sequence[str], mask: NeuronMask, step: int, phase: str) -> ActivationStats:
        cfg = self.cfg.collect
        batches = iter_token_batches(
            self.tokenizer, texts, token_limit=cfg.token_limit, batch_size=cfg.batch_size, device=self.device
        )
        which = required_fields(self.cfg.ff_scoring, self.cfg.attn_scoring)
        self.report(step, phase)
        with apply_mask(self.model, self.sites, mask):
            return collect_activations(
                self.model,
                self.sites,
                batches,
                sample_tokens=cfg.sample_tokens,
                exclude_first_token=cfg.exclude_first_token,
                which=which,
                on_batch=lambda tokens: self.report(step, phase, tokens),
            )

    def evaluate(self, mask: NeuronMask, step: int) -> tuple[dict[str, EvalResult], dict[str, Any]]:
        self.report(step, "evaluating")
        with apply_mask(self.model, self.sites, mask):
            results = evaluate_sets(
                self.model, self.tokenizer, self.eval_sets, self.cfg.eval, common_ids=self.common_ids
            )
        extra = self.extra_metrics(mask) if self.extra_metrics is not None else {}
        return results, extra

    def scores(
        self, stats: tuple[ActivationStats, ActivationStats] | None, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FF [layer, d_mlp] and attention [layer, d_attn] scores for this step."""
        cfg, sites = self.cfg, self.sites
        forget, retain = stats if stats is not None else (None, None)
        ff = score_neurons(
            cfg.ff_scoring,
            forget.ff if forget else None,
            retain.ff if retain else None,
            cfg.ff_eps,
            shape=(sites.n_layers, sites.d_mlp),
            generator=_selection_seed(cfg.seed, step, 0),
        )
        attn = score_neurons(
            cfg.attn_scoring,
            forget.attn if forget else None,
            retain.attn if retain else None,
            cfg.attn_eps,
            shape=(sites.n_layers, sites.d_attn),
            generator=_selection_seed(cfg.seed, step, 1),
        )
        return ff, attn

    def select(
        self,
        mask: NeuronMask,
        step: int,
        scores: tuple[torch.Tensor, torch.Tensor] | None,
        fracs: tuple[float, float],
    ) -> tuple[Selection, Selection]:
        """Choose FF and attention neurons among those `mask` keeps, at the given (ff, attn) fractions."""
        cfg, sites = self.cfg, self.sites
        ff_frac, attn_frac = fracs
        if cfg.random_baseline:
            ff = select_random_per_layer(mask.ff_keep, ff_frac, _selection_seed(cfg.seed, step, 2))
            attn = select_random_per_layer(
                mask.attn_keep,
                attn_frac,
                _selection_seed(cfg.seed, step, 3),
                group=sites.d_head if cfg.prune_heads else 1,
            )
            return ff, attn
        assert scores is not None
        ff_scores, attn_scores = scores
        ff = select_top_neurons(ff_scores, mask.ff_keep, ff_frac)
        if cfg.prune_heads:
            attn = select_top_heads(attn_scores, mask.attn_keep, attn_frac, sites.n_heads, cfg.head_reduce)
        else:
            attn = select_top_neurons(attn_scores, mask.attn_keep, attn_frac)
        return ff, attn


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
    start_mask: NeuronMask | None = None,
    history: Sequence[StepReport] = (),
    resume_mask: NeuronMask | None = None,
    on_step: Callable[[StepReport, NeuronMask], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    extra_metrics: Callable[[NeuronMask], dict[str, Any]] | None = None,
) -> PruneResult:
    """Prune `model`'s neurons specific to `forget` texts, keeping those used on `retain` texts.

    `start_mask` is the mask the run starts from (default: keep everything). To resume an
    interrupted run, pass the completed `history` and the mask after its last step as `resume_mask`;
    the run continues at the next step and draws exactly what it would have. `on_step` is called after
    every step (including step 0) with the report and the cumulative mask. Raises CancelledError when
    `should_stop()` turns true (checked between phases and batches).
    """
    model.eval()
    if stop := cfg.stop:
        if stop.forget_drop is not None and forget_eval not in eval_sets:
            raise ConfigError(f"stop.forget_drop needs an eval set named {forget_eval!r}")
        if stop.max_retain_drop is not None and retain_eval not in eval_sets:
            raise ConfigError(f"stop.max_retain_drop needs an eval set named {retain_eval!r}")
    run = _Run(
        model,
        tokenizer,
        sites,
        fingerprint,
        forget,
        retain,
        eval_sets,
        cfg,
        on_progress,
        should_stop,
        extra_metrics,
    )
    initial = start_mask if start_mask is not None else NeuronMask.full(sites, fingerprint)
    initial.check_fits(sites, fingerprint)
    mask = resume_mask if resume_mask is not None else initial
    done: list[StepReport] = list(history)
    baseline_top1: dict[str, float] = {}

    def finish_step(
        report: StepReport, results: dict[str, EvalResult], extra: dict[str, Any], started: float
    ) -> None:
        report.metrics = {name: result.as_dict() for name, result in results.items()}
        if not baseline_top1:
            baseline_top1.update({name: result.top1 for name, result in results.items()})
        report.drops = {
            name: relative_drop(baseline_top1[name], r.top1)
            for name, r in results.items()
            if name in baseline_top1
        }
        report.extra = extra
        report.seconds = time.monotonic() - started
        report.mask_id = mask.mask_id
        done.append(report)
        counts = mask.pruned_counts()
        log.info(
            "step %d/%d: pruned ff %d (+%d), attn %d (+%d); drops %s",
            report.step,
            cfg.n_steps,
            counts["ff"],
            report.ff_selected,
            counts["attn"],
            report.attn_selected,
            {k: round(v, 4) for k, v in report.drops.items()},
        )
        if on_step is not None:
            on_step(report, mask)

    if done:
        baseline_top1.update({name: m["top1"] for name, m in done[0].metrics.items()})
    elif cfg.run_pre_test:
        started = time.monotonic()
        results, extra = run.evaluate(mask, 0)
        counts = mask.pruned_counts()
        finish_step(
            StepReport(step=0, ff_pruned=counts["ff"], attn_pruned=counts["attn"]), results, extra, started
        )

    static_scores: tuple[torch.Tensor, torch.Tensor] | None = None
    first_step = max((r.step for r in done), default=0) + 1
    for step in range(first_step, cfg.n_steps + 1):
        if done and (reason := _stop_reason(cfg, done[-1], forget_eval, retain_eval)):
            return PruneResult(mask, done, reason)
        started = time.monotonic()
        tokens = 0
        scores = None
        if not cfg.random_baseline:
            if cfg.recalculate or static_scores is None:
                # Static mode scores the *starting* model once; recalculation scores the current one.
                source = mask if cfg.recalculate else initial
                retain_stats = run.collect(retain, source, step, "collecting_retain")
                forget_stats = run.collect(forget, source, step, "collecting_forget")
                tokens = retain_stats.n_tokens + forget_stats.n_tokens
                run.report(step, "scoring")
                scores = run.scores((forget_stats, retain_stats), step)
                if not cfg.recalculate:
                    static_scores = scores
            scores = scores if scores is not None else static_scores
        elif "rand" in (cfg.ff_scoring, cfg.attn_scoring):
            raise ConfigError("random_baseline draws its own neurons; use a statistic scoring, not 'rand'")
        if cfg.recalculate or cfg.random_baseline:
            ff_sel, attn_sel = run.select(mask, step, scores, (cfg.ff_frac, cfg.attn_frac))
            new_mask = NeuronMask(
                fingerprint, mask.ff_keep & ~ff_sel.chosen, mask.attn_keep & ~attn_sel.chosen, sites.n_heads
            )
        else:
            # Cumulative top min(1, frac * step) among neurons the starting mask keeps.
            cumulative = (min(1.0, step * cfg.ff_frac), min(1.0, step * cfg.attn_frac))
            ff_sel, attn_sel = run.select(initial, step, scores, cumulative)
            new_mask = NeuronMask(
                fingerprint,
                initial.ff_keep & ~ff_sel.chosen,
                initial.attn_keep & ~attn_sel.chosen,
                sites.n_heads,
            )
            ff_sel = Selection(mask.ff_keep & ~new_mask.ff_keep, ff_sel.threshold)
            attn_sel = Selection(mask.attn_keep & ~new_mask.attn_keep, attn_sel.threshold)
        if ff_sel.count == 0 and attn_sel.count == 0 and step > first_step and not cfg.random_baseline:
            return PruneResult(mask, done, "exhausted")
        mask = new_mask
        results, extra = run.evaluate(mask, step)
        counts = mask.pruned_counts()
        report = StepReport(
            step=step,
            ff_selected=ff_sel.count,
            attn_selected=attn_sel.count,
            ff_threshold=ff_sel.threshold,
            attn_threshold=attn_sel.threshold,
            ff_pruned=counts["ff"],
            attn_pruned=counts["attn"],
            ff_per_layer=ff_sel.per_layer(),
            attn_per_layer=attn_sel.per_layer(),
            tokens_collected=tokens,
        )
        finish_step(report, results, extra, started)
    reason = _stop_reason(cfg, done[-1], forget_eval, retain_eval) if done else None
    return PruneResult(mask, done, reason or "steps")
