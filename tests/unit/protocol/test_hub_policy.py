"""SELPRUNE_HUB_DATASETS as the gateway and the worker read it (protocol/hub_policy.py)."""

from __future__ import annotations

import pytest

from protocol.hub_policy import hub_dataset_refusal, is_hub_id, parse_hub_datasets


def test_parse_normalizes():
    assert parse_hub_datasets("") == parse_hub_datasets(" OFF ") == "off"
    assert parse_hub_datasets("Any") == "any"
    assert parse_hub_datasets(" org/a, b ,org/a,") == "org/a,b"


@pytest.mark.parametrize("bad", ["../x", "org/a,/etc", "json", "a b", "org/a,any"])
def test_parse_rejects_what_is_not_a_hub_id(bad):
    with pytest.raises(ValueError, match="hub_datasets"):
        parse_hub_datasets(bad)


def test_refusal():
    assert hub_dataset_refusal("any", "org/x") is None
    assert hub_dataset_refusal("org/x,y", "org/x") is None and hub_dataset_refusal("org/x,y", "y") is None
    off = hub_dataset_refusal("off", "org/x")
    assert off is not None and "SELPRUNE_HUB_DATASETS=off" in off and "'org/x'" in off
    listed = hub_dataset_refusal("org/x", "ORG/x")
    assert listed is not None and "allowlist" in listed and "org/x" in listed


def test_is_hub_id():
    assert is_hub_id("org/name") and is_hub_id("wikitext")
    assert not is_hub_id("csv") and not is_hub_id("a/b/c") and not is_hub_id("../x") and not is_hub_id("")
