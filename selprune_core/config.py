"""Algorithm settings as frozen dataclasses.

Defaults follow docs/method.md (the paper's code, read for every default) except where that
document says the authors' code is wrong; the fixes are named on the fields. Process settings (paths,
devices, Redis) never live here: the worker and the CLI turn their own settings into these objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from selprune_core.errors import ConfigError

__all__ = [
    "ScoringName",
    "OffsetMode",
    "SelectionMode",
    "CollectConfig",
    "EvalConfig",
    "StopConfig",
    "BudgetConfig",
    "PruneConfig",
    "SamplingConfig",
    "ToxicityConfig",
]

# freq/abs/rms/std/sqrt are the paper's importance functions with their true formulas; "mean" is the
# authors' |mu_f - mu_r| difference; "rand" draws i.i.d. scores; the legacy_* names reproduce the
# authors' formulas (std holding a variance, rms = sqrt(var^2 + mean^2)) for parity runs only.
# Ours: "dev" is the RMS deviation from the *retain* mean, the activation change that mean ablation
# causes; the *_out names weight a neuron's importance by the norm of its output weight column, so eps
# and the global ranking are in units of what the neuron writes to the residual stream. "taylor" and
# "taylor_mean" score by gradient attribution: the first-order change of the next-token loss when the
# neuron is set to 0 or to its retain mean (costs a backward pass per statistics batch).
ScoringName = Literal[
    "freq",
    "abs",
    "rms",
    "std",
    "sqrt",
    "mean",
    "rand",
    "legacy_rms",
    "legacy_std",
    "dev",
    "abs_out",
    "rms_out",
    "dev_out",
    "taylor",
    "taylor_mean",
]
SCORING_NAMES: tuple[str, ...] = ScoringName.__args__  # type: ignore[attr-defined]
# What a pruned neuron outputs: 0 (the paper) or its mean activation on the retain data.
OffsetMode = Literal["zero", "retain_mean"]
OFFSET_MODES: tuple[str, ...] = OffsetMode.__args__  # type: ignore[attr-defined]
# Global top-k over all layers (the paper), or each layer's own top fraction (a per-layer quota).
SelectionMode = Literal["global", "per_layer"]
SELECTION_MODES: tuple[str, ...] = SelectionMode.__args__  # type: ignore[attr-defined]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class CollectConfig:
    """How activation statistics are gathered for one dataset."""

    token_limit: int = 1000  # per-text truncation, in tokens
    sample_tokens: int = (
        100_000  # stop once more than this many tokens were counted; the last batch is kept whole
    )
    batch_size: int = 8  # texts (or packed windows) per forward pass; padded positions never count
    # Leave out the first k positions of every text (and of every packed window) from the statistics;
    # the authors count every position (0).
    skip_first: int = 0
    # Concatenate texts (EOS between them) and cut the stream into windows of token_limit tokens, so
    # that short-text and long-text datasets contribute same-length contexts; False: one text per row.
    pack: bool = False

    def __post_init__(self) -> None:
        _check(self.token_limit >= 2, f"token_limit must be >= 2, got {self.token_limit}")
        _check(self.sample_tokens >= 1, f"collect sample_tokens must be >= 1, got {self.sample_tokens}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(
            0 <= self.skip_first < self.token_limit,
            f"skip_first must be in [0, token_limit), got {self.skip_first}",
        )


@dataclass(frozen=True)
class EvalConfig:
    """Next-token evaluation of one held-out dataset."""

    token_limit: int = 1000  # per-text truncation, in tokens
    sample_tokens: int = 100_000  # stop once more than this many non-common ("skip") predictions were scored
    topk: int = 10  # k of the top-k accuracy
    skip_common: int = 50  # size of the most-common-target list excluded by the skip metrics
    batch_size: int = 8
    bootstrap_samples: int = 1000  # resamples over texts for the 95% confidence intervals; 0 disables CIs
    seed: int = 0  # bootstrap RNG seed

    def __post_init__(self) -> None:
        _check(self.token_limit >= 2, f"eval token_limit must be >= 2, got {self.token_limit}")
        _check(self.sample_tokens >= 1, f"eval sample_tokens must be >= 1, got {self.sample_tokens}")
        _check(self.topk >= 1, f"topk must be >= 1, got {self.topk}")
        _check(self.skip_common >= 0, f"skip_common must be >= 0, got {self.skip_common}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.bootstrap_samples >= 0, f"bootstrap_samples must be >= 0, got {self.bootstrap_samples}")


@dataclass(frozen=True)
class StopConfig:
    """Stop early once the forget set has dropped enough, or the retain set too much.

    Drops are relative top-1 drops, (acc_0 - acc_i) / acc_0, as in the paper's figures. The authors
    never stop early; this is our addition and is off unless set.
    """

    forget_drop: float | None = None  # stop once the forget drop reaches this (0..1)
    max_retain_drop: float | None = None  # stop once the retain drop exceeds this (0..1)

    def __post_init__(self) -> None:
        for name in ("forget_drop", "max_retain_drop"):
            value = getattr(self, name)
            _check(value is None or 0.0 <= value <= 1.0, f"stop.{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class BudgetConfig:
    """A retain budget as a goal: steps that would break it are retried smaller, never accepted.

    Every step is checked against the budget after it is tried. When it breaks the budget, the step
    is rejected, the per-step fractions are multiplied by `shrink`, and the step is retried from the
    last accepted mask (its scores reused, so a retry costs only an evaluation); later steps keep the
    smaller fractions. Rejected trials do not count as steps. The run ends when the
    forget target is reached, or when the fractions fall below `min_frac_ratio` times their start.
    Drops are relative top-1 drops against step 0; perplexity increase is ppl_i / ppl_0 - 1.
    """

    max_retain_drop: float | None = None  # 0..1; e.g. 0.05 = at most 5% relative top-1 drop
    max_retain_ppl_increase: float | None = None  # >= 0; e.g. 0.1 = retain perplexity at most +10%
    forget_target: float | None = None  # stop once the forget drop reaches this (0..1)
    shrink: float = 0.5  # fraction multiplier after a rejected step
    min_frac_ratio: float = 1 / 16  # give up once the fractions fall below this share of their start

    def __post_init__(self) -> None:
        _check(
            self.max_retain_drop is not None or self.max_retain_ppl_increase is not None,
            "a budget needs max_retain_drop or max_retain_ppl_increase",
        )
        for name in ("max_retain_drop", "forget_target"):
            value = getattr(self, name)
            _check(value is None or 0.0 <= value <= 1.0, f"budget.{name} must be in [0, 1], got {value}")
        value = self.max_retain_ppl_increase
        _check(
            value is None or (value >= 0 and math.isfinite(value)),
            f"budget.max_retain_ppl_increase must be >= 0, got {value}",
        )
        _check(0 < self.shrink < 1, f"budget.shrink must be in (0, 1), got {self.shrink}")
        _check(
            0 < self.min_frac_ratio < 1, f"budget.min_frac_ratio must be in (0, 1), got {self.min_frac_ratio}"
        )

    def breaks(self, retain_drop: float | None, retain_ppl_increase: float | None) -> list[str]:
        """The budget limits these measurements break (empty: within budget)."""
        broken = []
        if (
            self.max_retain_drop is not None
            and retain_drop is not None
            and retain_drop > self.max_retain_drop
        ):
            broken.append(f"retain drop {retain_drop:.4f} > {self.max_retain_drop}")
        limit = self.max_retain_ppl_increase
        if limit is not None and retain_ppl_increase is not None and not retain_ppl_increase <= limit:
            broken.append(f"retain perplexity increase {retain_ppl_increase:.4f} > {limit}")
        return broken


@dataclass(frozen=True)
class PruneConfig:
    """One selective-pruning run: what to score, how much to prune per step, and for how long."""

    ff_frac: float = 0.02  # fraction of *all* FF neurons selected per step (global top-k over layers)
    attn_frac: float = 0.0  # same for attention pre-out neurons (or heads when prune_heads)
    ff_scoring: ScoringName = "abs"
    attn_scoring: ScoringName = "abs"
    ff_eps: float = 1e-3  # epsilon in importance(F) / (importance(R) + eps) for FF neurons
    attn_eps: float = 1e-4  # same for attention neurons
    steps: int | None = None  # None: floor(1 / max(ff_frac, attn_frac)), the authors' CLI default
    recalculate: bool = True  # re-collect statistics on the pruned model every step (False: static scores)
    prune_heads: bool = False  # select whole heads by a per-head reduction of neuron scores
    head_reduce: Literal["mean", "median"] = "mean"  # true mean / median (the authors' names are swapped)
    random_baseline: bool = False  # per-layer random selection at the same fractions, no statistics
    seed: int = 0  # random baseline and "rand" scoring
    run_pre_test: bool = True  # evaluate before pruning (step 0)
    offset_mode: OffsetMode = "zero"  # what a pruned neuron outputs: 0, or its retain-set mean
    selection: SelectionMode = "global"  # global top-k across layers, or a per-layer quota
    stop: StopConfig | None = None
    budget: BudgetConfig | None = None  # adaptive step size under a retain budget (None: fixed steps)
    collect: CollectConfig = field(default_factory=CollectConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for name in ("ff_frac", "attn_frac"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")
        _check(self.ff_frac > 0 or self.attn_frac > 0, "at least one of ff_frac and attn_frac must be > 0")
        for name in ("ff_scoring", "attn_scoring"):
            value = getattr(self, name)
            _check(value in SCORING_NAMES, f"{name} must be one of {', '.join(SCORING_NAMES)}; got {value!r}")
        for name in ("ff_eps", "attn_eps"):
            value = getattr(self, name)
            _check(value > 0 and math.isfinite(value), f"{name} must be a positive number, got {value}")
        _check(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(
            self.head_reduce in ("mean", "median"),
            f"head_reduce must be mean or median, got {self.head_reduce!r}",
        )
        _check(
            self.offset_mode in OFFSET_MODES,
            f"offset_mode must be one of {', '.join(OFFSET_MODES)}; got {self.offset_mode!r}",
        )
        _check(
            self.selection in SELECTION_MODES,
            f"selection must be one of {', '.join(SELECTION_MODES)}; got {self.selection!r}",
        )
        # Checked here, not after the step-0 evaluation: "rand" scores are the random baseline's job.
        _check(
            not (self.random_baseline and "rand" in (self.ff_scoring, self.attn_scoring)),
            "random_baseline draws its own neurons; use a statistic scoring, not 'rand'",
        )

    @property
    def n_steps(self) -> int:
        """Number of pruning steps; the authors' default covers the whole model once."""
        if self.steps is not None:
            return self.steps
        return max(1, math.floor(1.0 / max(self.ff_frac, self.attn_frac)))


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings for generation; temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 50  # 0 disables top-k filtering
    top_p: float = 1.0  # 1.0 disables nucleus filtering
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends at the first of these strings (excluded from the text)
    ignore_eos: bool = False  # keep going past EOS (benchmarks: every row makes max_new_tokens tokens)
    logprobs: int | None = None  # report each token's log-probability and this many alternatives
    echo: bool = False  # with logprobs: the prompt's tokens get them too

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}")
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class ToxicityConfig:
    """The toxic-continuation metric: sample continuations of prompts and score them."""

    scorer: str = "profanity"  # "profanity" (alt-profanity-check, offline) or "detoxify" when installed
    samples_per_prompt: int = 1
    threshold: float = 0.8  # a continuation counts as toxic when its score exceeds this
    score_prompt: bool = False  # score prompt + continuation (the paper) instead of the continuation only
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=32))

    def __post_init__(self) -> None:
        _check(
            self.samples_per_prompt >= 1, f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}"
        )
        _check(0.0 <= self.threshold <= 1.0, f"toxicity threshold must be in [0, 1], got {self.threshold}")
