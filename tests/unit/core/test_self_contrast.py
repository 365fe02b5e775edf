"""Self-contrast corpora: a tiny random model's continuations, split by a deterministic in-test scorer."""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from selprune_core.config import SamplingConfig
from selprune_core.corpora import BUILTIN_CORPORA, MODEL_BUILTINS, load_builtin
from selprune_core.data import BuiltinRef, resolve_dataset
from selprune_core.errors import ConfigError, DatasetError, EmptyDatasetError
from selprune_core.generation import generate
from selprune_core.self_contrast import ContinuationConfig, generate_contrast
from selprune_core.splits import TextSplits
from selprune_core.toxicity import ToxicityScorer

PROMPTS = ["the cat sat on", "a quick brown fox", "she sells sea", "the weather is", "def add(a, b):"]
CFG = ContinuationConfig(
    samples_per_prompt=2, max_new_tokens=4, scorer="letters", threshold=0.5, batch_size=4
)
FINGERPRINT = "tinyllama0"


def letter_share(text: str, letters: str = string.ascii_letters) -> float:
    return sum(c in letters for c in text) / max(1, len(text))


class LetterScorer:
    """Deterministic toxicity: the share of a text's characters that are ASCII letters; counts its calls.

    A random model's continuations mix word pieces with stray bytes, so the shares spread over [0, 1].
    """

    name = "letters"

    def __init__(self, letters: str = string.ascii_letters) -> None:
        self.letters = letters
        self.calls = 0

    def score(self, texts: Sequence[str]) -> list[float]:
        self.calls += 1
        return [letter_share(t, self.letters) for t in texts]


def texts(splits: TextSplits) -> list[str]:
    return [*splits.train, *splits.heldout]


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "self_contrast").glob("*.json*"))


@pytest.fixture
def model(tiny_model: Callable[..., PreTrainedModel]) -> PreTrainedModel:
    return tiny_model("llama")


def test_scorer_satisfies_the_protocol() -> None:
    assert isinstance(LetterScorer(), ToxicityScorer)


def test_flagged_and_clean_partition_the_samples_by_threshold(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    scorer = LetterScorer()
    progress: list[tuple[int, int]] = []
    flagged, clean = generate_contrast(
        model,
        tokenizer,
        FINGERPRINT,
        PROMPTS,
        CFG,
        scorer,
        tmp_path,
        on_progress=lambda d, n: progress.append((d, n)),
    )
    assert flagged.name == "builtin:toxic_continuations" and clean.name == "builtin:clean_continuations"
    assert progress == [(2, 5), (4, 5), (5, 5)]  # whole prompts a batch: 2 prompts x 2 samples = 4 rows

    # The same rows generated in one call, independently: texts do not depend on the chunking.
    rows = [p for p in PROMPTS for _ in range(CFG.samples_per_prompt)]
    sampling = SamplingConfig(max_new_tokens=4, temperature=1.0, top_k=50, top_p=1.0, seed=0)
    expected = [
        p + g.text
        for p, g in zip(rows, generate(model, tokenizer, rows, sampling, batch_size=64), strict=True)
    ]
    expected = [t for t, p in zip(expected, rows, strict=True) if t[len(p) :].strip()]
    assert Counter(texts(flagged) + texts(clean)) == Counter(expected)

    # Flagged means the continuation alone (not the prompt) scores above the threshold.
    records = [
        json.loads(line)
        for line in next((tmp_path / "self_contrast").glob("*.jsonl")).read_text().splitlines()
    ]
    assert Counter(r["prompt"] + r["continuation"] for r in records) == Counter(expected)
    for r in records:
        assert r["score"] == letter_share(r["continuation"])
        assert r["prompt"] in PROMPTS and r["continuation"].strip()
    assert Counter(texts(flagged)) == Counter(
        r["prompt"] + r["continuation"] for r in records if r["score"] > 0.5
    )
    assert Counter(texts(clean)) == Counter(
        r["prompt"] + r["continuation"] for r in records if r["score"] <= 0.5
    )

    meta = json.loads(next((tmp_path / "self_contrast").glob("*-*.json")).read_text())
    assert meta["key"]["fingerprint"] == FINGERPRINT and meta["key"]["threshold"] == 0.5
    assert meta["counts"]["samples"] == len(rows) and meta["counts"]["kept"] == len(records)
    assert meta["counts"]["flagged"] == len(texts(flagged)) and meta["counts"]["clean"] == len(texts(clean))


def test_the_cache_is_reused(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    scorer = LetterScorer()
    first = generate_contrast(model, tokenizer, FINGERPRINT, PROMPTS, CFG, scorer, tmp_path)
    files = cache_files(tmp_path)
    assert len(files) == 2 and scorer.calls == 1
    mtimes = [f.stat().st_mtime_ns for f in files]
    # A different batch size does not change the texts, so it reads the same cache.
    second = generate_contrast(
        model, tokenizer, FINGERPRINT, PROMPTS, replace(CFG, batch_size=3), scorer, tmp_path
    )
    assert second == first and scorer.calls == 1
    assert cache_files(tmp_path) == files and [f.stat().st_mtime_ns for f in files] == mtimes


@pytest.mark.parametrize(
    "change",
    [
        {"threshold": 0.25},
        {"seed": 1},
        {"samples_per_prompt": 3},
        {"max_new_tokens": 3},
        {"temperature": 0.7},
        {"top_k": 10},
        {"top_p": 0.9},
        {"max_prompts": 4},
    ],
)
def test_a_changed_setting_gets_its_own_cache(
    change: dict[str, object], model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    scorer = LetterScorer()
    generate_contrast(model, tokenizer, FINGERPRINT, PROMPTS, CFG, scorer, tmp_path)
    before = set(cache_files(tmp_path))
    try:
        generate_contrast(model, tokenizer, FINGERPRINT, PROMPTS, replace(CFG, **change), scorer, tmp_path)  # type: ignore[arg-type]
    except EmptyDatasetError:  # a setting may leave one side empty; the cache is written all the same
        pass
    assert scorer.calls == 2 and len(set(cache_files(tmp_path)) - before) == 2


def test_other_model_scorer_or_prompts_get_their_own_cache(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    scorer = LetterScorer()
    generate_contrast(model, tokenizer, FINGERPRINT, PROMPTS, CFG, scorer, tmp_path)
    generate_contrast(model, tokenizer, "othermodel", PROMPTS, CFG, scorer, tmp_path)
    generate_contrast(model, tokenizer, FINGERPRINT, [*PROMPTS[:-1], "the dog sat on"], CFG, scorer, tmp_path)
    other = LetterScorer()
    other.name = "letters2"
    generate_contrast(
        model, tokenizer, FINGERPRINT, PROMPTS, replace(CFG, scorer="letters2"), other, tmp_path
    )
    assert scorer.calls == 3 and other.calls == 1 and len(cache_files(tmp_path)) == 8


def test_scorer_must_match_the_config(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="letters.*profanity"):
        generate_contrast(
            model, tokenizer, FINGERPRINT, PROMPTS, ContinuationConfig(), LetterScorer(), tmp_path
        )


def test_an_empty_side_raises_but_keeps_the_cache(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    scorer = LetterScorer(letters="")  # every score is 0: nothing is flagged
    for _ in range(2):
        with pytest.raises(EmptyDatasetError, match="toxic_continuations.*threshold"):
            generate_contrast(model, tokenizer, FINGERPRINT, PROMPTS, CFG, scorer, tmp_path)
    assert scorer.calls == 1 and len(cache_files(tmp_path)) == 2


@pytest.mark.parametrize(
    "bad", [{"samples_per_prompt": 0}, {"threshold": 1.5}, {"max_prompts": 0}, {"top_p": 0.0}]
)
def test_config_checks(bad: dict[str, object]) -> None:
    with pytest.raises((ConfigError, ValueError)):
        ContinuationConfig(**bad)  # type: ignore[arg-type]


def test_model_builtins_are_listed_but_need_a_model(tmp_path: Path) -> None:
    assert set(MODEL_BUILTINS) <= set(BUILTIN_CORPORA)
    for name in MODEL_BUILTINS:
        with pytest.raises(DatasetError, match=f"'{name}'.*needs a model.*worker"):
            load_builtin(name, tmp_path)
        with pytest.raises(DatasetError, match="needs a model"):
            resolve_dataset(BuiltinRef(name), data_root=tmp_path, cache_dir=tmp_path)
