"""Algorithm settings as frozen dataclasses.

Defaults follow ../shared/docs/method.md (the paper's code, read for every default) except where that
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
    "CollectConfig",
    "EvalConfig",
    "StopConfig",
    "PruneConfig",
    "SamplingConfig",
    "ToxicityConfig",
]

# freq/abs/rms/std/sqrt are the paper's importance functions with their true formulas; "mean" is the
# authors' |mu_f - mu_r| difference; "rand" draws i.i.d. scores; the legacy_* names reproduce the
# authors' formulas (std holding a variance, rms = sqrt(var^2 + mean^2)) for parity runs only.
ScoringName = Literal["freq", "abs", "rms", "std", "sqrt", "mean", "rand", "legacy_rms", "legacy_std"]
SCORING_NAMES: tuple[str, ...] = ScoringName.__args__  # type: ignore[attr-defined]


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
    batch_size: int = 8  # texts per forward pass; padded positions never count
    exclude_first_token: bool = False  # the authors count position 0 (BOS); set True to drop it

    def __post_init__(self) -> None:
        _check(self.token_limit >= 2, f"token_limit must be >= 2, got {self.token_limit}")
        _check(self.sample_tokens >= 1, f"collect sample_tokens must be >= 1, got {self.sample_tokens}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


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
    stop: StopConfig | None = None
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

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
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
