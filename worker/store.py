"""MaskStore: immutable, content-addressed neuron masks in Redis, visible per tenant.

Layout (key names in protocol/keys.py; the gateway reads these records, and deletes a tenant's hold
with protocol/scripts.py's `delete_mask`):

- `MASK_KEY` (hash), one per mask id, shared by every tenant holding the mask:
    * `bits`: the mask's safetensors bytes (`NeuronMask.to_bytes()`), written once with HSETNX and
      never overwritten: equal bits on the same model give the same id, so a second put is a no-op.
    * `meta`: JSON object of the facts the bits determine, `keys.MASK_SHARED_META` (`mask_id`,
      `fingerprint`, `shape`, `size_bytes`), written once with HSETNX.
- `TENANT_MASK_META_KEY` (string) per (tenant, mask): JSON of the whole meta as the tenant's first job
  to store the mask gave it (name, job id, model, params, datasets, metrics, plus the shared facts),
  written once with SET NX. Two tenants producing the same bits each see only their own; it goes with
  the tenant's hold (`delete_mask`).
- `TENANT_MASKS_KEY` (sorted set) per tenant: the mask ids the tenant may see, score = unix seconds
  when the tenant first stored it. A mask outside this set is "not found" for that tenant.
- `MASK_TENANTS_KEY` (set) per mask: the tenants holding it.

A put is one MULTI (HSETNX bits, HSETNX meta, SET NX tenant meta, SADD owner, ZADD NX tenant set),
queued by `queue_put` on the caller's transaction (the job's lease guards it). Puts and deletes are atomic, so a delete
racing a put by another tenant never strands an id without bits. Importing this module does not import
torch: `describe` imports `NeuronMask` when called.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from redis.client import Pipeline

from protocol import keys
from worker.errors import MaskNotFoundError

__all__ = ["MaskStore"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class MaskStore:
    """Masks of every tenant in one Redis. The client must return bytes (decode_responses=False)."""

    def __init__(self, redis_client: redis.Redis) -> None:
        self.redis = redis_client

    def describe(self, mask_bytes: bytes, meta: dict[str, Any]) -> tuple[str, str]:
        """Validate mask bytes; returns (mask id, meta JSON as stored). MaskMismatchError if not a mask."""
        from selprune_core.masks import NeuronMask

        mask = NeuronMask.from_bytes(mask_bytes)
        full_meta = {
            **meta,
            "mask_id": mask.mask_id,
            "fingerprint": mask.fingerprint,
            "shape": mask.shape_key,
            "size_bytes": len(mask_bytes),
        }
        return mask.mask_id, json.dumps(full_meta, sort_keys=True)

    def queue_put(self, pipe: Pipeline, mask_id: str, mask_bytes: bytes, meta_json: str, tenant: str) -> None:
        """Queue the writes that store a mask for `tenant` on a MULTI pipeline (the caller guards them).

        `meta_json` is `describe`'s: only its bit-derived fields go into the record other tenants share.
        """
        meta = json.loads(meta_json)
        shared = json.dumps({k: meta[k] for k in keys.MASK_SHARED_META if k in meta}, sort_keys=True)
        mask_key = keys.MASK_KEY.format(mask_id=mask_id)
        pipe.hsetnx(mask_key, "bits", mask_bytes)
        pipe.hsetnx(mask_key, "meta", shared)
        pipe.set(keys.TENANT_MASK_META_KEY.format(tenant=tenant, mask_id=mask_id), meta_json, nx=True)
        pipe.sadd(keys.MASK_TENANTS_KEY.format(mask_id=mask_id), tenant)
        pipe.zadd(keys.TENANT_MASKS_KEY.format(tenant=tenant), {mask_id: time.time()}, nx=True)

    def get_bytes(self, mask_id: str, tenant: str) -> bytes:
        """The mask's safetensors bytes; MaskNotFoundError unless `tenant` holds it."""
        raw = self._visible_field(mask_id, tenant, "bits")
        return raw if isinstance(raw, bytes) else raw.encode()

    def _visible_field(self, mask_id: str, tenant: str, field: str) -> bytes | str:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zscore(keys.TENANT_MASKS_KEY.format(tenant=tenant), mask_id)
            pipe.hget(keys.MASK_KEY.format(mask_id=mask_id), field)
            score, raw = pipe.execute()
        if score is None or raw is None:
            raise MaskNotFoundError(f"mask {mask_id} not found")
        assert isinstance(raw, bytes | str)
        return raw
