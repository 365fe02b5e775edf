"""Mask records on a real Redis, through the code that writes and reads them in production (a job's
writes, the worker's and the gateway's reads, the protocol's delete): content addressing,
immutability, tenant isolation, shared deletes."""

from __future__ import annotations

import pytest
import torch

from protocol import keys
from protocol.scripts import MaskRelease
from selprune_core.errors import MaskMismatchError
from selprune_core.masks import NeuronMask
from worker.errors import MaskNotFoundError

pytestmark = pytest.mark.redis


def tiny_mask(pruned: int = 0) -> NeuronMask:
    ff = torch.ones(2, 8, dtype=torch.bool)
    ff.view(-1)[:pruned] = False
    return NeuronMask("fp", ff, torch.ones(2, 8, dtype=torch.bool), 2)


@pytest.fixture
def store(masks):
    return masks


def test_put_get_list_delete(store, client):
    mask = tiny_mask(3)
    mask_id = store.put(mask.to_bytes(), {"name": "m1"}, "a")
    assert mask_id == mask.mask_id
    assert NeuronMask.from_bytes(store.get_bytes(mask_id, "a")) == mask
    meta = store.get_meta(mask_id, "a")
    assert meta["name"] == "m1" and meta["mask_id"] == mask_id and meta["fingerprint"] == "fp"
    second = store.put(tiny_mask(5).to_bytes(), {"name": "m2"}, "a")
    assert [m["name"] for m in store.list("a")] == ["m2", "m1"]  # newest first

    assert store.delete(mask_id, "a") is MaskRelease.deleted
    assert [m["mask_id"] for m in store.list("a")] == [second]
    assert not client.exists(keys.MASK_KEY.format(mask_id=mask_id))
    assert not client.exists(keys.MASK_TENANTS_KEY.format(mask_id=mask_id))
    with pytest.raises(MaskNotFoundError):
        store.get_bytes(mask_id, "a")
    assert store.delete(mask_id, "a") is MaskRelease.not_held


def test_masks_are_immutable(store, client):
    mask = tiny_mask(2)
    first = store.put(mask.to_bytes(), {"name": "first"}, "a")
    bits = client.hget(keys.MASK_KEY.format(mask_id=first), "bits")
    # Same bits (different header metadata) -> same id; stored bits and meta are not overwritten.
    again = store.put(mask.to_bytes({"note": "other header"}), {"name": "second"}, "a")
    assert again == first
    assert client.hget(keys.MASK_KEY.format(mask_id=first), "bits") == bits
    assert store.get_meta(first, "a")["name"] == "first"
    assert len(store.list("a")) == 1


def test_put_rejects_bytes_that_are_not_a_mask(store):
    with pytest.raises(MaskMismatchError):
        store.put(b"\x00" * 16, {}, "a")


def test_tenant_isolation(store):
    mask_id = store.put(tiny_mask(1).to_bytes(), {}, "a")
    with pytest.raises(MaskNotFoundError):
        store.get_bytes(mask_id, "b")
    assert store.get_meta(mask_id, "b") is None
    assert store.delete(mask_id, "b") is MaskRelease.not_held
    assert store.list("b") == []
    assert store.get_meta(mask_id, "a")["mask_id"] == mask_id  # b's failed delete changed nothing


def test_delete_by_one_tenant_keeps_the_mask_for_another(store, client):
    data = tiny_mask(4).to_bytes()
    mask_id = store.put(data, {}, "a")
    assert store.put(data, {}, "b") == mask_id
    assert store.delete(mask_id, "a") is MaskRelease.released  # b still holds it
    with pytest.raises(MaskNotFoundError):
        store.get_bytes(mask_id, "a")
    assert store.get_bytes(mask_id, "b") == client.hget(keys.MASK_KEY.format(mask_id=mask_id), "bits")
    assert store.delete(mask_id, "b") is MaskRelease.deleted
    assert not client.exists(keys.MASK_KEY.format(mask_id=mask_id))
