"""The planned runs of bench/fidelity.py: compute budgets, one RunSpec per pruning trajectory, and the
experiments that group them.

Data only. The runner (bench/fidelity_runner.py) executes these specs and the report modules
(bench/fidelity_tables.py and up) order runs by them; this module imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from protocol import RECIPES


@dataclass(frozen=True)
class Budget:
    """Compute budget shared by every run; `full` was fixed from timing alone, before any pruning run."""

    token_limit: int = 256  # per-text truncation for collection and evaluation (paper: 1000)
    collect_tokens: int = 4000  # tokens per dataset per statistics collection (paper: 1e5)
    eval_tokens: int = 3000  # non-common-token predictions per eval set per step (paper: 1e5)
    bootstrap: int = 1000  # bootstrap resamples for the 95% intervals
    batch_size: int = 8
    max_steps: int | None = None  # caps every run's steps (smoke tests only)
    tox_prompts: int | None = None  # None: all held-out toxic_prompts
    tox_samples: int = 1  # continuations per prompt
    tox_new_tokens: int = 32  # paper: 200
    tox_threshold: float = 0.8  # the paper's Detoxify threshold, applied to the profanity scorer


BUDGETS = {
    "full": Budget(),
    "smoke": Budget(
        token_limit=32,
        collect_tokens=150,
        eval_tokens=60,
        bootstrap=50,
        max_steps=2,
        tox_prompts=4,
        tox_new_tokens=4,
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """One pruning trajectory; fractions are per step, as in PruneConfig."""

    name: str
    forget: str  # builtin corpus names
    retain: str
    ff_frac: float = 0.02
    attn_frac: float = 0.0
    scoring: str = "abs"  # importance function for both components
    steps: int = 6
    random: bool = False
    tox_steps: tuple[int, ...] = ()  # steps at which the toxic-continuation rate is measured
    collect_tokens: int | None = None  # overrides the budget's statistics tokens (the budget check)
    # PruneConfig / CollectConfig overrides naming a recipe, e.g. (("offset_mode", "retain_mean"),)
    recipe: tuple[tuple[str, Any], ...] | None = None
    # "validation": statistics on the train texts minus a validation carve-out, which is evaluated;
    # None: statistics on all train texts, the held-out texts evaluated.
    split: str | None = None
    seed: int | None = None  # the random baseline's seed (default 0)
    match: str | None = None  # random baseline: copy this selective run's per-layer counts per step
    # BudgetConfig fields: the run adapts its step size, checked on a validation carve-out of train
    budget: tuple[tuple[str, Any], ...] | None = None
    tox_samples: int | None = None  # continuations per toxicity prompt (default: the budget's)
    tox_final: bool | None = None  # also measure toxicity on the final mask, whatever its step
    extra_eval: tuple[str, ...] | None = None  # more builtin corpora evaluated (held-out) every step


def _pair(spec: RunSpec, random_steps: int | None = None) -> list[RunSpec]:
    """A selective run and its random baseline at the same per-step fractions. `random_steps` lets the
    baseline go on further, so its curve reaches the retain drops of the selective run (random
    pruning costs only evaluations)."""
    rand = replace(
        spec, name=spec.name.rsplit("_", 1)[0] + "_random", random=True, steps=random_steps or spec.steps
    )
    if spec.tox_steps:  # step 0 is the same unpruned model in both runs: measure it once
        rand = replace(rand, tox_steps=tuple(s for s in spec.tox_steps if s > 0))
    return [spec, rand]


_CODE = dict(forget="python_code", retain="english_prose")


def _detox_random(seed: int) -> RunSpec:
    """Random pruning with detox_selprune's per-layer counts at every step."""
    return RunSpec(
        f"detox_random_s{seed}",
        forget="toxic_continuations",
        retain="clean_continuations",
        ff_frac=0.01,
        steps=8,
        random=True,
        seed=seed,
        match="detox_selprune",
        recipe=(("offset_mode", dict(_recipe("selprune"))["offset_mode"]),),
        tox_final=True,
        tox_samples=2,
        extra_eval=("english_prose",),
    )


def _recipe(name: str) -> tuple[tuple[str, Any], ...]:
    """A named recipe's method settings (protocol.RECIPES) as RunSpec overrides."""
    return tuple(sorted(RECIPES[name].items()))


# Paper defaults (docs/method.md §3.5, §5): abs importance, 2% of FF neurons per step; attention-only
# comparisons at 2% of attention neurons; toxicity with abs for both components at 0.5% per step for 10
# steps (adapted: the paper's 10-step toxicity run pruned attention only, its both-component run took
# one step). Only the number of steps is cut (6 instead of 50) to fit the CPU budget.
# The baselines of (a) and (b) run twice as many steps: the selective runs' retain drops outgrow what
# random pruning reaches at the same fraction, and the paper's claim is about the curves.
EXPERIMENTS: dict[str, list[RunSpec]] = {
    "code_vs_prose": [
        *_pair(RunSpec("code_ff_abs", **_CODE), random_steps=12),
        *_pair(RunSpec("prose_ff_abs", forget="english_prose", retain="python_code"), random_steps=12),
    ],
    "ff_vs_attn": [
        *_pair(RunSpec("code_ff_abs", **_CODE), random_steps=12),
        *_pair(RunSpec("code_attn_abs", **_CODE, ff_frac=0.0, attn_frac=0.02), random_steps=12),
        *_pair(RunSpec("code_both_abs", **_CODE, ff_frac=0.02, attn_frac=0.02), random_steps=12),
    ],
    "importance": [
        *[RunSpec(f"code_ff_{s}", **_CODE, scoring=s) for s in ("freq", "abs", "rms", "std")],
        RunSpec("code_ff_random", **_CODE, random=True, steps=12),
    ],
    "toxicity": _pair(
        RunSpec(
            "tox_both_abs",
            forget="toxic",
            retain="english_prose",
            ff_frac=0.005,
            attn_frac=0.005,
            steps=10,
            tox_steps=(0, 10),
        )
    ),
    # Same total (12% of FF neurons) reached in 6, 3, 2 and 1 steps, then in 12 steps of 1% (last,
    # the most expensive).
    "sensitivity": [
        *_pair(RunSpec("code_ff_abs", **_CODE), random_steps=12),
        *_pair(RunSpec("code_ff4_abs", **_CODE, ff_frac=0.04, steps=3)),
        *_pair(RunSpec("code_ff6_abs", **_CODE, ff_frac=0.06, steps=2)),
        *_pair(RunSpec("code_ff12_abs", **_CODE, ff_frac=0.12, steps=1)),
        *_pair(RunSpec("code_ff1_abs", **_CODE, ff_frac=0.01, steps=12)),
    ],
    # Choosing the defaults (issue 9): each change alone against the paper recipe, on a validation
    # split carved from the train texts (held-out texts are never read), FF at 2%/step for 6 steps.
    "recipes_val": [
        RunSpec("val_paper", **_CODE, split="validation"),
        RunSpec("val_skip1", **_CODE, split="validation", recipe=(("skip_first", 1),)),
        RunSpec("val_skip4", **_CODE, split="validation", recipe=(("skip_first", 4),)),
        RunSpec("val_pack", **_CODE, split="validation", recipe=(("pack", True),)),
        RunSpec("val_mean", **_CODE, split="validation", recipe=(("offset_mode", "retain_mean"),)),
        RunSpec(
            "val_dev_mean",
            **_CODE,
            split="validation",
            recipe=(("ff_scoring", "dev"), ("offset_mode", "retain_mean")),
        ),
        RunSpec("val_absout", **_CODE, split="validation", recipe=(("ff_scoring", "abs_out"),)),
        RunSpec("val_layer", **_CODE, split="validation", recipe=(("selection", "per_layer"),)),
    ],
    # Gradient attribution (added after the activation-statistics recipes above all stayed near a 36%
    # forget drop at a 5% retain drop on the validation split).
    # Combinations of the changes that did best alone on the validation split (run after those).
    "recipes_val_combo": [
        RunSpec(
            "val_combo",
            **_CODE,
            split="validation",
            recipe=(("ff_scoring", "dev"), ("offset_mode", "retain_mean"), ("selection", "per_layer")),
        ),
        RunSpec(
            "val_combo_out",
            **_CODE,
            split="validation",
            recipe=(("ff_scoring", "dev_out"), ("offset_mode", "retain_mean"), ("selection", "per_layer")),
        ),
    ],
    # Exploratory: 3 steps each (a step costs about 4x an activation-statistics step on the CPU).
    "recipes_val_taylor": [
        RunSpec(
            "val_taylor_mean",
            **_CODE,
            steps=3,
            split="validation",
            recipe=(("ff_scoring", "taylor_mean"), ("offset_mode", "retain_mean")),
        ),
        RunSpec("val_taylor", **_CODE, steps=3, split="validation", recipe=(("ff_scoring", "taylor"),)),
    ],
    # Held-out: the paper's recipe, each change alone, the chosen default, matched random x 3.
    "keep": [
        RunSpec("keep_paper", **_CODE, recipe=_recipe("paper")),
        RunSpec("keep_mean", **_CODE, recipe=(("offset_mode", "retain_mean"),)),
        RunSpec("keep_dev_mean", **_CODE, recipe=(("ff_scoring", "dev"), ("offset_mode", "retain_mean"))),
        RunSpec("keep_absout", **_CODE, recipe=(("ff_scoring", "abs_out"),)),
        RunSpec("keep_selprune", **_CODE, recipe=_recipe("selprune")),
        *[
            RunSpec(
                f"keep_random_s{seed}",
                **_CODE,
                random=True,
                seed=seed,
                match="keep_selprune",
                recipe=(("offset_mode", dict(_recipe("selprune"))["offset_mode"]),),
            )
            for seed in range(3)
        ],
    ],
    # The default demo job's settings (selprune demo) on held-out texts: the retain budget steers on a
    # validation carve-out of the train texts.
    "keep_budget": [
        RunSpec(
            "keep_budget",
            **_CODE,
            steps=10,
            recipe=_recipe("selprune"),
            budget=(("max_retain_ppl_increase", 0.1), ("forget_target", 0.6)),
        ),
    ],
    # Toxicity (issue 9): the paper's recipe on the old data (forget toxic prompt prefixes, retain
    # English prose) against the same-register recipe (forget the model's own flagged continuations,
    # keep its unflagged ones) with the default method and a retain budget, and random pruning matched
    # to the latter's per-layer counts (3 seeds). Toxicity: 5 continuations of each held-out prompt.
    "detox": [
        RunSpec(
            "detox_paper",
            forget="toxic",
            retain="english_prose",
            ff_frac=0.005,
            attn_frac=0.005,
            steps=10,
            recipe=_recipe("paper"),
            tox_steps=(0,),
            tox_final=True,
            tox_samples=5,
            extra_eval=("clean_continuations",),
        ),
        RunSpec(
            "detox_selprune",
            forget="toxic_continuations",
            retain="clean_continuations",
            ff_frac=0.01,
            steps=8,
            recipe=_recipe("selprune"),
            budget=(("max_retain_ppl_increase", 0.1),),
            tox_final=True,
            tox_samples=5,
            extra_eval=("english_prose",),
        ),
    ],
    # Its random baselines, split in two experiments so that two processes share the 2 cores; 2 samples
    # per prompt (468 continuations) to fit the session's CPU time, against 5 for the runs above.
    "detox_random_a": [_detox_random(0), _detox_random(1)],
    "detox_random_b": [_detox_random(2)],
    # Does the 25x smaller statistics budget matter? The main run again with 4x the tokens.
    "collect_budget": [
        RunSpec("code_ff_abs", **_CODE),
        RunSpec("code_ff_abs16k", **_CODE, collect_tokens=16_000),
        RunSpec("code_ff_random", **_CODE, random=True, steps=12),
    ],
}
