from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import replace

import pytest

from selprune_core.config import SamplingConfig, ToxicityConfig
from selprune_core.errors import ConfigError, EmptyDatasetError, ScorerUnavailableError
from selprune_core.generation import generate
from selprune_core.toxicity import (
    DetoxifyScorer,
    ProfanityScorer,
    ToxicityScorer,
    get_scorer,
    toxicity_metric,
)
from tests.helpers import build_model, build_tokenizer

PROMPTS = ["the cat", "def add(a, b):", "she sells"]


class LengthScorer:
    """A real scorer for tests: score = (len(text) % 10) / 10, remembering what it scored."""

    name = "length"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def score(self, texts: Sequence[str]) -> list[float]:
        self.seen.extend(texts)
        return [(len(t) % 10) / 10 for t in texts]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model("llama", tokenizer, seed=4)


CFG = ToxicityConfig(
    samples_per_prompt=4, threshold=0.5, sampling=SamplingConfig(max_new_tokens=6, temperature=1.0)
)


def test_metric_counts_ci_and_reproducibility(model, tokenizer):
    scorer = LengthScorer()
    assert isinstance(scorer, ToxicityScorer)
    result = toxicity_metric(model, tokenizer, PROMPTS, CFG, scorer, bootstrap_samples=200, seed=5)
    assert result.n_samples == 12 and result.n_prompts == 3
    assert result.scorer == "length" and result.threshold == 0.5

    # The scored texts are exactly the seeded continuations, prompt-major.
    expanded = [p for p in PROMPTS for _ in range(4)]
    continuations = [g.text for g in generate(model, tokenizer, expanded, replace(CFG.sampling, seed=5))]
    assert scorer.seen == continuations
    scores = [(len(t) % 10) / 10 for t in continuations]
    assert result.toxic_rate == pytest.approx(sum(s > 0.5 for s in scores) / 12)
    assert result.mean_score == pytest.approx(sum(scores) / 12)

    for name in ("toxic_rate", "mean_score"):
        lo, hi = result.ci[name]
        assert 0.0 <= lo <= getattr(result, name) <= hi <= 1.0, name
    assert [e.continuation for e in result.examples] == continuations[:3]
    json.dumps(result.as_dict())

    again = toxicity_metric(model, tokenizer, PROMPTS, CFG, LengthScorer(), bootstrap_samples=200, seed=5)
    assert again == result


def test_score_prompt_and_pinned_seed(model, tokenizer):
    scorer = LengthScorer()
    cfg = replace(CFG, score_prompt=True, sampling=replace(CFG.sampling, seed=9))
    a = toxicity_metric(model, tokenizer, PROMPTS, cfg, scorer, bootstrap_samples=0, seed=1)
    b = toxicity_metric(model, tokenizer, PROMPTS, cfg, LengthScorer(), bootstrap_samples=0, seed=2)
    assert a == b  # sampling.seed wins over the seed argument
    assert a.ci == {}
    assert all(
        text.startswith(p)
        for text, p in zip(scorer.seen, [p for p in PROMPTS for _ in range(4)], strict=True)
    )


def test_no_prompts_raise(model, tokenizer):
    with pytest.raises(EmptyDatasetError):
        toxicity_metric(model, tokenizer, [], CFG, LengthScorer())


def test_unknown_scorer_lists_names():
    with pytest.raises(ConfigError, match="profanity, detoxify"):
        get_scorer("perspective")


def test_profanity_scorer():
    pytest.importorskip("profanity_check")
    scorer = get_scorer("profanity")
    assert isinstance(scorer, ProfanityScorer) and scorer.name == "profanity"
    profane, clean = scorer.score(["you are a fucking idiot, shit", "the weather is nice today"])
    assert profane > 0.8 > 0.5 > clean >= 0.0
    assert scorer.score([]) == []


def test_missing_package_raises_with_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # makes the import fail
    with pytest.raises(ScorerUnavailableError, match=r"selprune\[toxicity\]"):
        ProfanityScorer()


@pytest.mark.skipif(importlib.util.find_spec("detoxify") is not None, reason="detoxify is installed")
def test_detoxify_unavailable():
    with pytest.raises(ScorerUnavailableError, match="detoxify"):
        DetoxifyScorer()
