"""A retain budget as a goal: measure a candidate mask on the budget sets and say what it breaks.

The prune loop tries each step, asks `BudgetCheck.measure` about the candidate mask, and rejects it
when the answer lists broken limits. Measurements are relative to the unpruned model on the same
sets (step 0): the relative top-1 drops of the forget and retain sets and the retain perplexity
increase. The budget sets are a validation split, so held-out texts never steer the run.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from selprune_core.config import BudgetConfig
from selprune_core.evaluation import EvalResult, relative_drop
from selprune_core.masks import NeuronMask

__all__ = ["BudgetCheck"]

# Evaluates a mask at a step on the budget sets: set name -> result.
Evaluate = Callable[[NeuronMask, int], Mapping[str, EvalResult]]


class BudgetCheck:
    """Checks candidate masks against a BudgetConfig, relative to the first mask it measures."""

    def __init__(self, cfg: BudgetConfig, evaluate: Evaluate, *, forget_eval: str, retain_eval: str) -> None:
        self.cfg, self.evaluate = cfg, evaluate
        self.forget_eval, self.retain_eval = forget_eval, retain_eval
        self.base: Mapping[str, EvalResult] = {}

    def measure(self, mask: NeuronMask, step: int) -> dict[str, Any]:
        """Drops and perplexity increase of `mask` on the budget sets, and the limits it breaks.

        The first call measures the baseline (the unpruned model).
        """
        results = self.evaluate(mask, step)
        if not self.base:
            self.base = results
        retain, forget = results[self.retain_eval], results[self.forget_eval]
        retain_base, forget_base = self.base[self.retain_eval], self.base[self.forget_eval]
        retain_drop = relative_drop(retain_base.top1, retain.top1)
        ppl_increase = retain.perplexity / retain_base.perplexity - 1.0
        return {
            "forget_drop": relative_drop(forget_base.top1, forget.top1),
            "retain_drop": retain_drop,
            "retain_ppl_increase": ppl_increase,
            "broken": self.cfg.breaks(retain_drop, ppl_increase),
            "forget_top1": forget.top1,
            "retain_top1": retain.top1,
            "retain_perplexity": retain.perplexity,
        }

    def target_met(self, measured: Mapping[str, Any]) -> bool:
        """Whether a measurement reaches the forget target (never, without one)."""
        target = self.cfg.forget_target
        return target is not None and measured.get("forget_drop", 0.0) >= target

    @staticmethod
    def sets_missing(sets: Collection[str], forget_eval: str, retain_eval: str) -> list[str]:
        return sorted({forget_eval, retain_eval} - set(sets))
