"""Pruning parameters: the method knobs of an unlearning job, its named recipes and presets."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from protocol.base import Strict
from protocol.constants import OffsetMode, RecipeName, ScoringName, SelectionMode

# Cost caps: the contract refuses a job whose cost has no bound, so the gateway rejects it before queueing
# and a worker re-validating the payload refuses it too. The gateway's settings may cap budgets lower.
# Tokens per forward pass (rows x token_limit): activations and logits scale with it.
MAX_BATCH_TOKENS = 32_768
MAX_TOKEN_BUDGET = 10_000_000  # ceiling of collect_tokens and eval_tokens (SELPRUNE_MAX_*_TOKENS cap lower)
MAX_EVAL_DATASETS = 16  # extra eval sets of a prune job, datasets of an evaluation job
JOB_SEED_LIMIT = 2**32  # seeds in [0, 2**32): the core seeds generators with seed * 1_000_003 + step * 7 + k
MAX_EPS = 1e6  # ff_eps / attn_eps: far above any importance statistic, far below float32's overflow
MAX_BUDGET_TRIALS = 64  # rejected trials of a budgeted run: log(min_frac_ratio) / log(shrink)


def check_batch_tokens(rows: int, token_limit: int, rows_field: str, limit_field: str) -> None:
    """ValueError naming both fields when `rows` texts of `token_limit` tokens exceed MAX_BATCH_TOKENS."""
    if rows * token_limit > MAX_BATCH_TOKENS:
        raise ValueError(
            f"{rows_field} x {limit_field} = {rows} x {token_limit} = {rows * token_limit} tokens per forward "
            f"pass; the limit is {MAX_BATCH_TOKENS} (lower {rows_field} or {limit_field})"
        )


class StopSpec(Strict):
    model_config = ConfigDict(allow_inf_nan=False)

    forget_drop: float | None = Field(
        default=None, ge=0, le=1, description="stop once the forget top-1 drop reaches this"
    )
    max_retain_drop: float | None = Field(
        default=None, ge=0, le=1, description="stop once the retain drop exceeds this"
    )


class BudgetSpec(Strict):
    """A retain budget: a step that breaks it is retried smaller from the last accepted mask."""

    model_config = ConfigDict(allow_inf_nan=False)

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
        # Each rejected trial costs an evaluation, and a run shrinks at most this many times.
        trials = math.log(self.min_frac_ratio) / math.log(self.shrink)
        if trials > MAX_BUDGET_TRIALS:
            raise ValueError(
                f"min_frac_ratio {self.min_frac_ratio} with shrink {self.shrink} allows {math.ceil(trials)} "
                f"trials of a step; the limit is {MAX_BUDGET_TRIALS} (raise min_frac_ratio or lower shrink)"
            )
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

    model_config = ConfigDict(allow_inf_nan=False)

    recipe: RecipeName = Field(
        default="selprune", description="named defaults for the method fields: selprune (ours) or paper"
    )
    ff_frac: float = Field(default=0.02, ge=0, le=1, description="fraction of all FF neurons pruned per step")
    attn_frac: float = Field(
        default=0.0, ge=0, le=1, description="fraction of attention pre-out neurons per step"
    )
    ff_scoring: ScoringName = "abs"
    attn_scoring: ScoringName = "abs"
    # Finite, and far from float32's overflow (the scores are float32 tensors: 1e39 there is inf).
    ff_eps: float = Field(default=1e-3, gt=0, le=MAX_EPS, allow_inf_nan=False)
    attn_eps: float = Field(default=1e-4, gt=0, le=MAX_EPS, allow_inf_nan=False)
    steps: int = Field(default=5, ge=1, le=1000)
    collect_tokens: int = Field(
        default=10_000, ge=1, le=MAX_TOKEN_BUDGET, description="tokens per dataset per collection"
    )
    token_limit: int = Field(default=512, ge=2, le=8192, description="per-text truncation")
    eval_tokens: int = Field(
        default=5_000, ge=1, le=MAX_TOKEN_BUDGET, description="non-common-token predictions per eval set"
    )
    batch_size: int = Field(
        default=8,
        ge=1,
        le=256,
        description=f"texts per forward pass; batch_size x token_limit <= {MAX_BATCH_TOKENS}",
    )
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
    seed: int = Field(
        default=0, ge=0, lt=JOB_SEED_LIMIT, description="seeds random selections and bootstraps"
    )
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

    @model_validator(mode="after")
    def _bounded(self) -> PruneParams:
        check_batch_tokens(self.batch_size, self.token_limit, "batch_size", "token_limit")
        if self.skip_first >= self.token_limit:
            raise ValueError(
                f"skip_first ({self.skip_first}) must be below token_limit ({self.token_limit}): "
                "it would leave no position to count"
            )
        return self
