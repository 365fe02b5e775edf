from __future__ import annotations

import json

import pytest

from selprune_core.degeneration import (
    degeneration_stats,
    distinct_n,
    empty_rate,
    ngrams,
    repetition_rate,
    seq_rep_n,
    words,
)

# Hand-made continuations; words: [the cat the cat], [], [], [a b c d a b c d].
TEXTS = ["The cat the  CAT", "", "  \n", "a b c d a b c d"]


def test_words_and_ngrams():
    assert words(" The\tCat\nsat ") == ["the", "cat", "sat"]
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert ngrams(["a", "b"], 4) == []
    with pytest.raises(ValueError):
        ngrams(["a"], 0)


def test_distinct_n_pools_texts_without_crossing_them():
    # Bigrams: (the cat)(cat the)(the cat) + (a b)(b c)(c d)(d a)(a b)(b c)(c d) = 10, 6 distinct.
    assert distinct_n(TEXTS, 2) == pytest.approx(6 / 10)
    # Unigrams: 4 + 8 = 12, distinct {the, cat, a, b, c, d} = 6.
    assert distinct_n(TEXTS, 1) == pytest.approx(6 / 12)
    # "x y" then "z": no bigram (y z) across the boundary.
    assert distinct_n(["x y", "z"], 2) == 1.0
    assert distinct_n(["", "one"], 2) is None and distinct_n([], 2) is None


def test_seq_rep_4_and_repetition_rate():
    # 4-grams: text 1 has one (the cat the cat) -> rep 0; text 4 has abcd bcda cdab dabc abcd -> 1 - 4/5.
    # The empty texts have none and are left out of the mean.
    assert seq_rep_n(TEXTS, 4) == pytest.approx((0.0 + 0.2) / 2)
    # Only text 4 repeats a 4-gram; the denominator is all 4 texts.
    assert repetition_rate(TEXTS, 4) == pytest.approx(1 / 4)
    assert seq_rep_n(["a b c", ""], 4) is None
    assert repetition_rate([], 4) is None
    assert seq_rep_n(["go " * 10], 4) == pytest.approx(1 - 1 / 7)  # 7 four-grams, all "go go go go"


def test_empty_rate():
    assert empty_rate(TEXTS) == pytest.approx(2 / 4)
    assert empty_rate(["x"]) == 0.0 and empty_rate([]) is None


def test_degeneration_stats_bundle():
    stats = degeneration_stats(TEXTS, [5, 0, 1, 9])
    assert stats.n_texts == 4
    assert stats.distinct_1 == pytest.approx(0.5) and stats.distinct_2 == pytest.approx(0.6)
    assert stats.seq_rep_4 == pytest.approx(0.1) and stats.repetition_rate == pytest.approx(0.25)
    assert stats.empty_rate == pytest.approx(0.5)
    assert stats.mean_words == pytest.approx((4 + 0 + 0 + 8) / 4)
    assert stats.mean_tokens == pytest.approx(15 / 4)
    assert degeneration_stats(TEXTS).mean_tokens is None
    with pytest.raises(ValueError, match="token counts"):
        degeneration_stats(TEXTS, [1])


def test_degeneration_stats_of_nothing_is_json():
    out = degeneration_stats([]).as_dict()
    assert out["n_texts"] == 0
    assert all(v is None for k, v in out.items() if k != "n_texts")
    json.dumps(out, allow_nan=False)
