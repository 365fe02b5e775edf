"""Helpers for gateway tests: API keys and tenants, a Redis key snapshot, writers for job and mask
hashes in the worker's layout, and the error-shape assertion."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from protocol import keys
from service.auth import tenant_for_key

KEY_A = "key-a-secret"
KEY_B = "key-b-secret"
TENANT_A = tenant_for_key(KEY_A)
TENANT_B = tenant_for_key(KEY_B)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def snapshot(r: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key and its serialized value: equal snapshots mean nothing was written."""
    return {k: r.dump(k) for k in sorted(r.keys("*"))}


def put_job(r: redis.Redis, job_id: str, tenant: str, state: str = "succeeded", **fields: Any) -> None:
    """A job hash as the worker leaves it (a minimal prune job)."""
    now = time.time()
    payload = {"job_kind": "prune", "job_id": job_id, "tenant": tenant, "name": fields.pop("name", None)}
    values: dict[str, Any] = {
        "state": state,
        "kind": "prune",
        "tenant": tenant,
        "payload": json.dumps(payload),
        "created_at": repr(now - 10),
        "attempts": "1",
    }
    if state != "queued":
        values["started_at"] = repr(now - 9)
    if state in ("succeeded", "failed", "cancelled"):
        values["finished_at"] = repr(now - 1)
    values.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
    r.hset(keys.JOB_KEY.format(job_id=job_id), mapping=values)
    r.zadd(keys.TENANT_JOBS_KEY.format(tenant=tenant), {job_id: now})
    r.zadd(keys.ALL_JOBS_KEY, {job_id: now})


def put_mask(r: redis.Redis, mask_id: str, *tenants: str, model: str = "smollm2-135m-instruct") -> bytes:
    """A mask hash (bits and the bit-derived meta), its owners set, and each tenant's visibility entry
    and own meta (worker/store.py's layout); returns the bits."""
    bits = b"\x00\x01safetensors-bytes-" + mask_id.encode()
    shared = {"mask_id": mask_id, "fingerprint": "fp123", "shape": "2x8", "size_bytes": len(bits)}
    meta = {
        **shared,
        "model": model,
        "params": {"ff_frac": 0.02},
        "ff_pruned_per_layer": [1, 2],
        "metrics": [{"step": 0}],
        "created_at": time.time(),
        "name": f"mask {mask_id}",
        "job_id": "j" * 32,
    }
    r.hset(keys.MASK_KEY.format(mask_id=mask_id), mapping={"bits": bits, "meta": json.dumps(shared)})
    for tenant in tenants:
        r.sadd(keys.MASK_TENANTS_KEY.format(mask_id=mask_id), tenant)
        r.zadd(keys.TENANT_MASKS_KEY.format(tenant=tenant), {mask_id: time.time()})
        r.set(keys.TENANT_MASK_META_KEY.format(tenant=tenant, mask_id=mask_id), json.dumps(meta))
    return bits


def assert_error(resp: Any, status: int, type: str, *in_message: str) -> dict[str, Any]:
    """The response has `status` and the one error shape, with `type` and each string in the message."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == type, body
    for text in in_message:
        assert text in body["error"]["message"], body
    error: dict[str, Any] = body["error"]
    return error
