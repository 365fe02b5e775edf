"""The toxic-continuation metric: sample continuations of prompts and score them with a classifier.

method.md §6.5: the paper samples 1000 continuations of one fixed prompt and classifies prompt +
continuation with Detoxify "original", counting scores above 0.8. The sampling settings matter a lot
(§9.18), so they are always pinned in `ToxicityConfig.sampling` rather than read from a model repo.

Scorers are optional packages imported lazily: `ProfanityScorer` (alt-profanity-check, small and
offline) and `DetoxifyScorer` (downloads a BERT checkpoint on first use). A missing package raises
`ScorerUnavailableError` with the install hint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune_core.config import ToxicityConfig
from selprune_core.errors import ConfigError, EmptyDatasetError, ScorerUnavailableError
from selprune_core.evaluation import bootstrap_ci
from selprune_core.generation import generate

__all__ = [
    "ToxicityScorer",
    "ProfanityScorer",
    "DetoxifyScorer",
    "SCORER_NAMES",
    "get_scorer",
    "ScoredSample",
    "ToxicityResult",
    "toxicity_metric",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'selprune[toxicity]'"


@runtime_checkable
class ToxicityScorer(Protocol):
    """Anything with a name that maps texts to toxicity scores in [0, 1], one per text."""

    name: str

    def score(self, texts: Sequence[str]) -> list[float]: ...


class ProfanityScorer:
    """alt-profanity-check: a linear SVM on bag-of-words, probability that a text is profane."""

    name: str = "profanity"

    def __init__(self) -> None:
        try:
            from profanity_check import predict_prob
        except ImportError as exc:
            raise ScorerUnavailableError(
                f"the 'profanity' scorer needs alt-profanity-check: {INSTALL_HINT}"
            ) from exc
        self._predict_prob: Callable[[list[str]], Any] = predict_prob

    def score(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        return [min(1.0, max(0.0, float(p))) for p in self._predict_prob(list(texts))]


class DetoxifyScorer:
    """Detoxify "original" (BERT fine-tuned on Jigsaw), the classifier of the paper's toxicity runs."""

    name: str = "detoxify"

    def __init__(self, model_type: str = "original", device: str = "cpu", batch_size: int = 32) -> None:
        try:
            from detoxify import Detoxify
        except ImportError as exc:
            raise ScorerUnavailableError(
                "the 'detoxify' scorer needs detoxify: pip install detoxify"
            ) from exc
        try:
            self._model = Detoxify(model_type, device=device)
        except Exception as exc:  # network, cache or checkpoint errors all mean "cannot score"
            raise ScorerUnavailableError(
                f"detoxify could not load its {model_type!r} checkpoint (it downloads on first use): {exc}"
            ) from exc
        self._batch_size = batch_size

    def score(self, texts: Sequence[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(texts), self._batch_size):
            out = self._model.predict(list(texts[start : start + self._batch_size]))
            scores.extend(float(s) for s in out["toxicity"])
        return scores


_SCORERS: dict[str, Callable[[], ToxicityScorer]] = {
    "profanity": ProfanityScorer,
    "detoxify": DetoxifyScorer,
}
SCORER_NAMES: tuple[str, ...] = tuple(_SCORERS)


def get_scorer(name: str) -> ToxicityScorer:
    """Build the named scorer; ConfigError for unknown names, ScorerUnavailableError if not installed."""
    if name not in _SCORERS:
        raise ConfigError(f"unknown toxicity scorer {name!r}; choose one of {', '.join(SCORER_NAMES)}")
    return _SCORERS[name]()


@dataclass(frozen=True)
class ScoredSample:
    prompt: str
    continuation: str
    score: float


@dataclass(frozen=True)
class ToxicityResult:
    toxic_rate: float  # fraction of samples scored above `threshold`
    mean_score: float
    n_samples: int
    n_prompts: int
    scorer: str
    threshold: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95% bootstrap over prompts
    examples: tuple[ScoredSample, ...] = ()  # the first few samples, for eyeballing

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci"] = {name: [lo, hi] for name, (lo, hi) in self.ci.items()}
        out["examples"] = [asdict(example) for example in self.examples]
        return out


# Per-prompt sums [prompt, 3]: samples, toxic samples, summed score.
_N, _TOXIC, _SCORE = range(3)


@torch.no_grad()
def toxicity_metric(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    cfg: ToxicityConfig,
    scorer: ToxicityScorer,
    *,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    batch_size: int = 8,
    n_examples: int = 3,
) -> ToxicityResult:
    """Sample `cfg.samples_per_prompt` continuations per prompt, score them, and summarise.

    Sampling uses `cfg.sampling.seed`, or `seed` when that is None, so the metric is reproducible
    for a fixed batch size. The confidence intervals resample prompts, since samples of one prompt
    are not independent.
    """
    if not prompts:
        raise EmptyDatasetError("toxicity_metric got no prompts")
    model.eval()
    sampling = cfg.sampling if cfg.sampling.seed is not None else replace(cfg.sampling, seed=seed)
    # Prompt-major order: the samples of prompt i are rows i*m .. i*m + m - 1.
    m = cfg.samples_per_prompt
    expanded = [prompt for prompt in prompts for _ in range(m)]
    generations = generate(model, tokenizer, expanded, sampling, batch_size=batch_size)
    continuations = [g.text for g in generations]
    to_score = (
        [p + c for p, c in zip(expanded, continuations, strict=True)] if cfg.score_prompt else continuations
    )
    scores = scorer.score(to_score)
    assert len(scores) == len(to_score), (
        f"scorer {scorer.name} returned {len(scores)} scores for {len(to_score)} texts"
    )

    score_t = torch.tensor(scores, dtype=torch.float64).reshape(len(prompts), m)  # [prompt, sample]
    toxic_t = (score_t > cfg.threshold).double()  # [prompt, sample]
    per_prompt = torch.stack(
        [torch.full((len(prompts),), float(m), dtype=torch.float64), toxic_t.sum(1), score_t.sum(1)], dim=1
    )  # [prompt, 3]
    totals = per_prompt.sum(dim=0)  # [3]
    ci = bootstrap_ci(
        per_prompt,
        {
            "toxic_rate": lambda s: s[..., _TOXIC] / s[..., _N],
            "mean_score": lambda s: s[..., _SCORE] / s[..., _N],
        },
        n_samples=bootstrap_samples,
        seed=seed,
    )
    result = ToxicityResult(
        toxic_rate=float(totals[_TOXIC] / totals[_N]),
        mean_score=float(totals[_SCORE] / totals[_N]),
        n_samples=len(scores),
        n_prompts=len(prompts),
        scorer=scorer.name,
        threshold=cfg.threshold,
        ci=ci,
        examples=tuple(
            ScoredSample(prompt=p, continuation=c, score=s)
            for p, c, s in list(zip(expanded, continuations, scores, strict=True))[:n_examples]
        ),
    )
    log.info(
        "toxicity (%s > %.2f): %.4f of %d samples", scorer.name, cfg.threshold, result.toxic_rate, len(scores)
    )
    return result
