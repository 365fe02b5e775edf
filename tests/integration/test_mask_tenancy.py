"""Mask metadata is per tenant: two tenants producing the same bits share the bits and the facts the bits
determine, never each other's name, job id, params, datasets or metrics (a job's writes, the gateway's
reads, the protocol's delete, on a real Redis)."""

from __future__ import annotations

import json

import pytest
import torch

from protocol import keys
from protocol.scripts import MaskRelease
from selprune_core.masks import NeuronMask
from tests.integration.records import store_mask

pytestmark = pytest.mark.redis

META_A = {
    "name": "a-private-name",
    "job_id": "a" * 32,
    "model": "tiny",
    "params": {"ff_frac": 0.1},
    "forget": "file:a-secret.jsonl",
    "metrics": [{"step": 0, "loss": 1.0}],
}
META_B = {"name": "b-name", "job_id": "b" * 32, "model": "tiny"}


def mask_bytes() -> bytes:
    ff = torch.ones(2, 8, dtype=torch.bool)
    ff.view(-1)[:3] = False
    return NeuronMask("fp", ff, torch.ones(2, 8, dtype=torch.bool), 2).to_bytes()


def test_a_second_tenant_with_the_same_bits_sees_only_its_own_meta(client, masks):
    data = mask_bytes()
    mask_id = store_mask(client, data, META_A, "a")
    assert store_mask(client, data, META_B, "b") == mask_id

    for tenant, own, other in (("a", META_A, META_B), ("b", META_B, META_A)):
        meta = masks.get_meta(mask_id, tenant)
        assert meta is not None
        assert {k: meta[k] for k in own} == own
        assert meta["mask_id"] == mask_id and meta["fingerprint"] == "fp" and meta["size_bytes"] == len(data)
        listed = masks.list(tenant)
        assert [m["name"] for m in listed] == [own["name"]]
        assert other["job_id"] not in json.dumps(meta) + json.dumps(listed)

    b_only = masks.get_meta(mask_id, "b")
    assert (
        b_only is not None and "params" not in b_only and "metrics" not in b_only and "forget" not in b_only
    )
    # The record both share holds only what the bits determine.
    shared = json.loads(client.hget(keys.MASK_KEY.format(mask_id=mask_id), "meta"))
    assert set(shared) == set(keys.MASK_SHARED_META)


def test_delete_removes_only_the_tenants_meta(client, masks):
    data = mask_bytes()
    mask_id = store_mask(client, data, META_A, "a")
    store_mask(client, data, META_B, "b")
    a_key = keys.TENANT_MASK_META_KEY.format(tenant="a", mask_id=mask_id)
    b_key = keys.TENANT_MASK_META_KEY.format(tenant="b", mask_id=mask_id)

    assert masks.delete(mask_id, "a") is MaskRelease.released
    assert not client.exists(a_key) and client.exists(b_key)
    assert masks.get_meta(mask_id, "a") is None
    assert masks.get_meta(mask_id, "b")["name"] == "b-name"

    again = store_mask(client, data, {"name": "a-again"}, "a")  # a stores it anew: its new meta shows
    assert again == mask_id and masks.get_meta(mask_id, "a")["name"] == "a-again"

    assert masks.delete(mask_id, "b") is MaskRelease.released
    assert masks.delete(mask_id, "a") is MaskRelease.deleted
    assert not client.exists(a_key, b_key, keys.MASK_KEY.format(mask_id=mask_id))


def test_a_tenants_meta_is_written_once(client, masks):
    data = mask_bytes()
    mask_id = store_mask(client, data, META_A, "a")
    store_mask(client, data, {"name": "rerun"}, "a")  # the same bits again: the first meta stays
    assert masks.get_meta(mask_id, "a")["name"] == "a-private-name"


def test_a_record_from_before_per_tenant_meta_shows_no_one_elses_fields(client, masks):
    # Layout of earlier versions: the first writer's whole meta in the shared hash.
    data = mask_bytes()
    mask_id = store_mask(client, data, META_A, "a")
    legacy = {**META_A, "mask_id": mask_id, "fingerprint": "fp", "shape": "x", "size_bytes": len(data)}
    client.hset(keys.MASK_KEY.format(mask_id=mask_id), "meta", json.dumps(legacy))
    client.zadd(keys.TENANT_MASKS_KEY.format(tenant="b"), {mask_id: 1.0})
    client.sadd(keys.MASK_TENANTS_KEY.format(mask_id=mask_id), "b")
    meta = masks.get_meta(mask_id, "b")
    assert meta is not None and meta["fingerprint"] == "fp" and "name" not in meta and "job_id" not in meta
