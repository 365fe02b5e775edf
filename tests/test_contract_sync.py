"""The gateway's copies of the core's dataset rules (in worker/payloads.py) equal the core's own."""

from __future__ import annotations

from selprune_core import corpora, data
from worker import payloads


def test_dataset_rules_match_the_core():
    assert set(payloads.BUILTIN_DATASETS) == set(corpora.BUILTIN_CORPORA)
    assert payloads.FILE_SUFFIXES == data.FILE_SUFFIXES
    assert payloads.HUB_ID_PATTERN.pattern == data._HUB_ID.pattern
    assert payloads.FILTER_PATTERN.pattern == data._FILTER.pattern
    assert payloads.PACKAGED_BUILDERS == data._PACKAGED_BUILDERS


def test_embedded_model_name_matches_the_core():
    from selprune_core.loading import EMBEDDED_MODEL

    assert payloads.EMBEDDED_MODEL == EMBEDDED_MODEL
