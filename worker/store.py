"""MaskStore: immutable, content-addressed neuron masks in Redis, visible per tenant.

Layout (key names in protocol/keys.py). The gateway reads and deletes masks itself with these commands
(it cannot import this module's `put`, which needs torch), so this is a contract:

- `MASK_KEY` (hash), one per mask id:
    * `bits`: the mask's safetensors bytes (`NeuronMask.to_bytes()`), written once with HSETNX and
      never overwritten: equal bits on the same model give the same id, so a second put is a no-op.
    * `meta`: JSON object, written once with HSETNX (the first writer's). Always holds `mask_id`,
      `fingerprint`, `shape` and `size_bytes`, plus what the job passed (name, job id, params, ...).
- `TENANT_MASKS_KEY` (sorted set) per tenant: the mask ids the tenant may see, score = unix seconds
  when the tenant first stored it. A mask outside this set is "not found" for that tenant.
- `MASK_TENANTS_KEY` (set) per mask: the tenants holding it.

`put` is one MULTI (HSETNX bits, HSETNX meta, SADD owner, ZADD NX tenant set). `delete` is one Lua
script: ZREM from the tenant's set, SREM the owner, and DEL the mask hash and owner set once no tenant
holds the mask. Both are atomic, so a delete racing a put by another tenant never strands an id
without bits.

Importing this module does not import torch: `put` imports `NeuronMask` when called.
"""

from __future__ import annotations

import builtins
import json
import time
from typing import Any

import redis
from redis.client import Pipeline

from protocol import keys
from worker.errors import MaskNotFoundError

__all__ = ["MaskStore"]

# KEYS: tenant masks zset, mask owners set, mask hash. ARGV: mask id, tenant.
# Returns 0 when the tenant did not hold the mask (nothing changed), 1 when it let go, 2 when the
# mask's data was deleted as well.
_DELETE_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  return 2
end
return 1
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class MaskStore:
    """Masks of every tenant in one Redis. The client must return bytes (decode_responses=False)."""

    def __init__(self, redis_client: redis.Redis) -> None:
        self.redis = redis_client
        self._delete = redis_client.register_script(_DELETE_LUA)

    def put(self, mask_bytes: bytes, meta: dict[str, Any], tenant: str) -> str:
        """Store a mask for `tenant` (validating it) and return its content-addressed id."""
        mask_id, meta_json = self.describe(mask_bytes, meta)
        with self.redis.pipeline(transaction=True) as pipe:
            self.queue_put(pipe, mask_id, mask_bytes, meta_json, tenant)
            pipe.execute()
        return mask_id

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
        """Queue the writes of `put` on a MULTI pipeline (so a caller can guard them, e.g. by a lease)."""
        mask_key = keys.MASK_KEY.format(mask_id=mask_id)
        pipe.hsetnx(mask_key, "bits", mask_bytes)
        pipe.hsetnx(mask_key, "meta", meta_json)
        pipe.sadd(keys.MASK_TENANTS_KEY.format(mask_id=mask_id), tenant)
        pipe.zadd(keys.TENANT_MASKS_KEY.format(tenant=tenant), {mask_id: time.time()}, nx=True)

    def get_bytes(self, mask_id: str, tenant: str) -> bytes:
        """The mask's safetensors bytes; MaskNotFoundError unless `tenant` holds it."""
        raw = self._visible_field(mask_id, tenant, "bits")
        return raw if isinstance(raw, bytes) else raw.encode()

    def get_meta(self, mask_id: str, tenant: str) -> dict[str, Any]:
        """The mask's metadata; MaskNotFoundError unless `tenant` holds it."""
        meta = json.loads(_text(self._visible_field(mask_id, tenant, "meta")))
        assert isinstance(meta, dict), f"mask {mask_id}: meta is not a JSON object"
        return meta

    def list(self, tenant: str) -> builtins.list[dict[str, Any]]:
        """Metadata of every mask the tenant holds, newest first."""
        ids = [_text(i) for i in self.redis.zrevrange(keys.TENANT_MASKS_KEY.format(tenant=tenant), 0, -1)]
        with self.redis.pipeline(transaction=False) as pipe:
            for mask_id in ids:
                pipe.hget(keys.MASK_KEY.format(mask_id=mask_id), "meta")
            metas = pipe.execute()
        out = []
        for raw in metas:
            if raw is not None:  # deleted between the two reads
                out.append(json.loads(_text(raw)))
        return out

    def delete(self, mask_id: str, tenant: str) -> bool:
        """Drop the tenant's hold on a mask. Returns True when the mask's data was deleted too
        (no other tenant holds it). MaskNotFoundError unless `tenant` held it."""
        outcome = self._delete(
            keys=[
                keys.TENANT_MASKS_KEY.format(tenant=tenant),
                keys.MASK_TENANTS_KEY.format(mask_id=mask_id),
                keys.MASK_KEY.format(mask_id=mask_id),
            ],
            args=[mask_id, tenant],
        )
        if outcome == 0:
            raise MaskNotFoundError(f"mask {mask_id} not found")
        return bool(outcome == 2)

    def _visible_field(self, mask_id: str, tenant: str, field: str) -> bytes | str:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zscore(keys.TENANT_MASKS_KEY.format(tenant=tenant), mask_id)
            pipe.hget(keys.MASK_KEY.format(mask_id=mask_id), field)
            score, raw = pipe.execute()
        if score is None or raw is None:
            raise MaskNotFoundError(f"mask {mask_id} not found")
        assert isinstance(raw, bytes | str)
        return raw
