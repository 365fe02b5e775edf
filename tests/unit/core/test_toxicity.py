from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch

from selprune_core.config import SamplingConfig, ToxicityConfig
from selprune_core.degeneration import degeneration_stats
from selprune_core.errors import ConfigError, EmptyDatasetError, ScorerUnavailableError
from selprune_core.generation import generate
from selprune_core.toxicity import (
    DetoxifyScorer,
    ProfanityScorer,
    ToxicityScorer,
    get_scorer,
    toxicity_metric,
    wilson_interval,
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


def _score(text: str) -> float:
    return (len(text) % 10) / 10


def _seeded_continuations(model, tokenizer, seed: int) -> list[str]:
    expanded = [p for p in PROMPTS for _ in range(4)]
    return [g.text for g in generate(model, tokenizer, expanded, replace(CFG.sampling, seed=seed))]


def test_metric_counts_ci_and_reproducibility(model, tokenizer):
    scorer = LengthScorer()
    assert isinstance(scorer, ToxicityScorer)
    result = toxicity_metric(model, tokenizer, PROMPTS, CFG, scorer, bootstrap_samples=200, seed=5)
    assert result.n_samples == 12 and result.n_prompts == 3
    assert result.scorer == "length" and result.threshold == 0.5 and result.score_prompt is False

    # One scorer call on 2N texts: the seeded continuations, prompt-major, then prompt + continuation.
    expanded = [p for p in PROMPTS for _ in range(4)]
    continuations = _seeded_continuations(model, tokenizer, 5)
    with_prompt = [p + c for p, c in zip(expanded, continuations, strict=True)]
    assert scorer.seen == continuations + with_prompt
    scores_c = [_score(t) for t in continuations]
    scores_p = [_score(t) for t in with_prompt]
    toxic_c = sum(s > 0.5 for s in scores_c)
    toxic_p = sum(s > 0.5 for s in scores_p)
    assert result.toxic_rate_continuation == pytest.approx(toxic_c / 12)
    assert result.toxic_rate_with_prompt == pytest.approx(toxic_p / 12)
    assert result.mean_score_continuation == pytest.approx(sum(scores_c) / 12)
    assert result.mean_score_with_prompt == pytest.approx(sum(scores_p) / 12)
    # score_prompt=False: the headline numbers are the continuation-only ones.
    assert result.toxic_rate == result.toxic_rate_continuation
    assert result.mean_score == result.mean_score_continuation

    for name in ("toxic_rate", "mean_score"):
        for suffix in ("", "_continuation", "_with_prompt"):
            lo, hi = result.ci[name + suffix]
            assert 0.0 <= lo <= getattr(result, name + suffix) <= hi <= 1.0, name + suffix
    assert result.ci["toxic_rate"] == result.ci["toxic_rate_continuation"]  # same resamples, same column
    assert result.wilson == {
        "toxic_rate": wilson_interval(toxic_c, 12),
        "toxic_rate_continuation": wilson_interval(toxic_c, 12),
        "toxic_rate_with_prompt": wilson_interval(toxic_p, 12),
    }
    for name, (lo, hi) in result.wilson.items():
        assert 0.0 <= lo <= getattr(result, name) <= hi <= 1.0, name
    assert [e.continuation for e in result.examples] == continuations[:3]
    assert [(e.score, e.score_continuation, e.score_with_prompt) for e in result.examples] == list(
        zip(scores_c[:3], scores_c[:3], scores_p[:3], strict=True)
    )

    again = toxicity_metric(model, tokenizer, PROMPTS, CFG, LengthScorer(), bootstrap_samples=200, seed=5)
    assert again == result


def test_degeneration_block_matches_continuations(model, tokenizer):
    result = toxicity_metric(model, tokenizer, PROMPTS, CFG, LengthScorer(), bootstrap_samples=0, seed=5)
    expanded = [p for p in PROMPTS for _ in range(4)]
    gens = generate(model, tokenizer, expanded, replace(CFG.sampling, seed=5))
    expected = degeneration_stats([g.text for g in gens], [g.completion_tokens for g in gens])
    assert result.degeneration == expected
    assert expected.n_texts == 12 and 0 < (expected.mean_tokens or 0) <= CFG.sampling.max_new_tokens

    out = result.as_dict()
    assert out["degeneration"] == expected.as_dict()
    assert set(out["degeneration"]) >= {"distinct_2", "seq_rep_4", "repetition_rate", "empty_rate"}
    assert out["wilson"]["toxic_rate"] == list(result.wilson["toxic_rate"])
    assert set(out["wilson"]) == {"toxic_rate", "toxic_rate_continuation", "toxic_rate_with_prompt"}
    for key in ("toxic_rate_continuation", "toxic_rate_with_prompt"):
        assert out[key] == getattr(result, key)
    json.loads(json.dumps(out, allow_nan=False))


def test_score_prompt_and_pinned_seed(model, tokenizer):
    scorer = LengthScorer()
    cfg = replace(CFG, score_prompt=True, sampling=replace(CFG.sampling, seed=9))
    a = toxicity_metric(model, tokenizer, PROMPTS, cfg, scorer, bootstrap_samples=0, seed=1)
    b = toxicity_metric(model, tokenizer, PROMPTS, cfg, LengthScorer(), bootstrap_samples=0, seed=2)
    assert a == b  # sampling.seed wins over the seed argument
    assert a.ci == {}
    assert a.wilson  # Wilson needs no resampling, so it is there even without a bootstrap
    # The second half of the scored texts is prompt + continuation.
    assert all(
        text.startswith(p)
        for text, p in zip(scorer.seen[12:], [p for p in PROMPTS for _ in range(4)], strict=True)
    )
    # score_prompt=True: the headline numbers are the prompt + continuation ones.
    assert a.score_prompt is True
    assert a.toxic_rate == a.toxic_rate_with_prompt and a.mean_score == a.mean_score_with_prompt
    assert a.wilson["toxic_rate"] == a.wilson["toxic_rate_with_prompt"]
    assert all(e.score == e.score_with_prompt for e in a.examples)


def _forced_token(model: torch.nn.Module, token_id: int) -> torch.utils.hooks.RemovableHandle:
    """Break `model`: a hook on its LM head makes every step's logits pick `token_id`."""

    def hook(module: torch.nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(out, -1e4)
        forced[..., token_id] = 1e4
        return forced

    return model.get_output_embeddings().register_forward_hook(hook)


def test_broken_models_show_in_degeneration(tokenizer):
    """A model that emits nothing, or one word over and over, looks non-toxic; degeneration shows why."""
    broken = build_model("llama", tokenizer, seed=4)
    handle = _forced_token(broken, tokenizer.eos_token_id)
    try:
        silent = toxicity_metric(broken, tokenizer, PROMPTS, CFG, LengthScorer(), bootstrap_samples=0)
    finally:
        handle.remove()
    assert silent.toxic_rate_continuation == 0.0 and silent.mean_score_continuation == 0.0
    assert silent.wilson["toxic_rate_continuation"][0] == 0.0
    deg = silent.degeneration
    assert deg is not None and deg.empty_rate == 1.0 and deg.mean_tokens == 0.0 and deg.mean_words == 0.0
    assert deg.distinct_2 is None and deg.seq_rep_4 is None and deg.repetition_rate == 0.0
    out = silent.as_dict()
    assert out["degeneration"]["distinct_2"] is None
    json.dumps(out, allow_nan=False)

    (the,) = tokenizer.encode(" the", add_special_tokens=False)
    handle = _forced_token(broken, the)
    try:
        looping = toxicity_metric(broken, tokenizer, PROMPTS, CFG, LengthScorer(), bootstrap_samples=0)
    finally:
        handle.remove()
    assert looping.examples[0].continuation == " the" * 6
    deg = looping.degeneration
    # 12 continuations of 6 x "the": 5 bigrams each, 1 distinct; 3 four-grams each, 1 distinct.
    assert deg is not None and deg.empty_rate == 0.0 and deg.mean_tokens == 6.0
    assert deg.distinct_2 == pytest.approx(1 / 60)
    assert deg.seq_rep_4 == pytest.approx(1 - 1 / 3) and deg.repetition_rate == 1.0


# Expected values from the formula in wilson_interval's docstring with z = 1.96 (z² = 3.8416):
#   0/10:  centre = (0 + 0.19208) / 1.38416 = 0.138770, half = 1.38416⁻¹·1.96·sqrt(3.8416/400) = 0.138770
#          -> (0, 0.277540)
#   5/10:  centre = 0.5, half = 1.416021·sqrt(0.025 + 0.009604) = 0.263411 -> (0.236589, 0.763411)
#   1/1000: centre = (0.001 + 0.0019208) / 1.0038416 = 0.0029096,
#          half = 1.952499·sqrt(0.000000999 + 0.0000009604) = 0.0027331 -> (0.0001765, 0.0056427)
#   10/10: the mirror of 0/10 -> (0.722460, 1)
@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (0, 10, 0.0, 0.277540),
        (5, 10, 0.236589, 0.763411),
        (1, 1000, 0.0001765, 0.0056427),
        (10, 10, 0.722460, 1.0),
    ],
)
def test_wilson_interval_known_values(k, n, lo, hi):
    got_lo, got_hi = wilson_interval(k, n)
    assert got_lo == pytest.approx(lo, abs=2e-6) and got_hi == pytest.approx(hi, abs=2e-6)


def test_wilson_interval_properties_and_errors():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0  # exact at the edges
    lo, hi = wilson_interval(3, 40)
    lo99, hi99 = wilson_interval(3, 40, z=2.576)
    assert lo99 < lo < 3 / 40 < hi < hi99  # a wider z widens the interval
    # Symmetric under swapping successes and failures.
    assert wilson_interval(7, 20) == pytest.approx(tuple(1 - x for x in reversed(wilson_interval(13, 20))))
    assert all(math.isfinite(x) for x in wilson_interval(1, 1))
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


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
