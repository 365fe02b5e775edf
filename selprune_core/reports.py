"""What a pruning run reports: one StepReport per step (and per rejected trial), progress inside a
step, and the final result. Plain dataclasses that round-trip through JSON (`as_dict`/`from_dict`), so
a worker can persist every step and resume from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from selprune_core.masks import NeuronMask

__all__ = ["StepReport", "PruneResult", "Progress"]


@dataclass
class StepReport:
    """What one step (or one trial of a step, under a budget) did and measured; step 0 is the baseline."""

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
    ff_frac: float = 0.0  # per-step fractions this step used
    attn_frac: float = 0.0
    accepted: bool = True  # False: a trial that broke the budget; the mask stayed as it was
    trial: int = 0  # 0 for the first try of a step, then 1, 2, ... for smaller retries
    # Under a budget: drops and retain perplexity increase on the budget sets, and what broke.
    budget: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepReport:
        return cls(**dict(data))


@dataclass
class PruneResult:
    mask: NeuronMask
    history: list[StepReport]  # every step and trial, accepted or not
    # "steps", "forget_drop", "max_retain_drop", "exhausted", "forget_target", "budget_floor"
    stopped_reason: str


@dataclass(frozen=True)
class Progress:
    """Inside-a-step progress: which phase, and tokens counted so far in it."""

    step: int
    phase: str  # "evaluating", "checking_budget", "collecting_retain", "collecting_forget", "scoring"
    tokens: int = 0
