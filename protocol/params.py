"""Pruning parameters: the method knobs of an unlearning job, its named recipes and presets."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from protocol.base import Strict
from protocol.constants import OffsetMode, RecipeName, ScoringName, SelectionMode


class StopSpec(Strict):
    forget_drop: float | None = Field(
        default=None, ge=0, le=1, description="stop once the forget top-1 drop reaches this"
    )
    max_retain_drop: float | None = Field(
        default=None, ge=0, le=1, description="stop once the retain drop exceeds this"
    )


class BudgetSpec(Strict):
    """A retain budget: a step that breaks it is retried smaller from the last accepted mask."""

    max_retain_drop: float | None = Field(
        default=None, ge=0, le=1, description="largest relative retain top-1 drop a step may leave"
    )
    max_retain_ppl_increase: float | None = Field(
        default=None, ge=0, le=100, description="largest retain perplexity increase, e.g. 0.1 = +10%"
    )
    forget_target: float | None = Field(
        default=None, ge=0, le=1, description="stop once the forget top-1 drop reaches this"
    )
    shrink: float = Field(default=0.5, gt=0, lt=1, description="fraction multiplier after a rejected step")
    min_frac_ratio: float = Field(
        default=1 / 16, gt=0, lt=1, description="give up below this share of the starting fractions"
    )

    @model_validator(mode="after")
    def _has_a_limit(self) -> BudgetSpec:
        if self.max_retain_drop is None and self.max_retain_ppl_increase is None:
            raise ValueError("a budget needs max_retain_drop or max_retain_ppl_increase")
        return self


# Named recipes: the method settings a job gets for every field it leaves unset. "paper" is the
# authors' method as run (abs importance, zero ablation, every position counted, global top-k);
# "selprune" is ours, chosen on a validation split (docs/results.md, "Choosing the defaults").
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "ff_scoring": "abs",
        "attn_scoring": "abs",
        "offset_mode": "zero",
        "skip_first": 0,
        "pack": False,
        "selection": "global",
    },
    "selprune": {
        "ff_scoring": "dev",
        "attn_scoring": "dev",
        "offset_mode": "retain_mean",
        "skip_first": 0,
        "pack": False,
        "selection": "per_layer",
    },
}


# Presets: whole recommended jobs, one field in POST /v1/unlearn. A request's own fields win over the
# preset's (params key by key). "detox" removes toxicity: forget the model's own continuations of toxic
# prompts that the scorer flags, keep its continuations of the same prompts that it does not flag (same
# register and length), check English prose as well, under a retain perplexity budget.
PresetName = Literal["detox"]
PRESETS: dict[str, dict[str, Any]] = {
    "detox": {
        "name": "detox",
        "forget": {"kind": "builtin", "name": "toxic_continuations"},
        "retain": {"kind": "builtin", "name": "clean_continuations"},
        "eval": [{"kind": "builtin", "name": "english_prose"}],
        "params": {
            "recipe": "selprune",
            "ff_frac": 0.01,
            "attn_frac": 0.0,
            "steps": 8,
            "budget": {"max_retain_ppl_increase": 0.1},
        },
    },
}


def apply_preset(data: Any) -> Any:
    """A request body with its preset's fields filled in where the body leaves them out."""
    if not isinstance(data, dict) or data.get("preset") is None:
        return data
    preset = PRESETS.get(str(data["preset"]))
    if preset is None:  # the Literal check reports the unknown name
        return data
    merged = {**preset, **data}
    if isinstance(data.get("params"), dict):
        merged["params"] = {**preset.get("params", {}), **data["params"]}
    return merged


class PruneParams(Strict):
    """Algorithm knobs. Fields left unset take the values of `recipe`; budgets are sized so the
    default job on the embedded model finishes in minutes on 2 CPU cores (the paper uses 1e5 tokens
    per collection)."""

    recipe: RecipeName = Field(
        default="selprune", description="named defaults for the method fields: selprune (ours) or paper"
    )
    ff_frac: float = Field(default=0.02, ge=0, le=1, description="fraction of all FF neurons pruned per step")
    attn_frac: float = Field(
        default=0.0, ge=0, le=1, description="fraction of attention pre-out neurons per step"
    )
    ff_scoring: ScoringName = "abs"
    attn_scoring: ScoringName = "abs"
    ff_eps: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    attn_eps: float = Field(default=1e-4, gt=0, allow_inf_nan=False)
    steps: int = Field(default=5, ge=1, le=1000)
    collect_tokens: int = Field(default=10_000, ge=1, description="tokens per dataset per collection")
    token_limit: int = Field(default=512, ge=2, le=8192, description="per-text truncation")
    eval_tokens: int = Field(default=5_000, ge=1, description="non-common-token predictions per eval set")
    batch_size: int = Field(default=8, ge=1, le=256)
    recalculate: bool = True
    prune_heads: bool = False
    head_reduce: Literal["mean", "median"] = "mean"
    offset_mode: OffsetMode = Field(
        default="zero", description="what a pruned neuron outputs: zero, or retain_mean (its retain-set mean)"
    )
    selection: SelectionMode = Field(
        default="global", description="global top-k across layers, or per_layer quotas"
    )
    skip_first: int = Field(
        default=0, ge=0, le=64, description="leave out each text's first positions from the statistics"
    )
    pack: bool = Field(
        default=False, description="pack texts into full token_limit windows for the statistics"
    )
    exclude_first_token: bool = Field(default=False, description="deprecated: the same as skip_first=1")
    seed: int = 0
    random_baseline: bool = False
    stop: StopSpec | None = None
    budget: BudgetSpec | None = Field(
        default=None, description="adaptive step size under a retain budget, checked on a validation split"
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        # Fields the caller left out take the recipe's values; explicit fields always win.
        if not isinstance(data, dict):
            return data
        name = data.get("recipe", "selprune")
        recipe = RECIPES.get(name) if isinstance(name, str) else None
        if recipe is None:  # let the Literal check report the unknown name
            return data
        return {**recipe, **data}
