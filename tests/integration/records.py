"""Synchronous handles on the production code that writes and reads the shared Redis records, for the
integration tests: the protocol's scripts (enqueue, cancel, mask delete), `JobHash.decode`, the
worker's mask writes and the gateway's `QueueClient` reads. Nothing here re-implements a command.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis

from protocol import keys, scripts
from protocol.job_hash import JobHash
from service.queue_client import QueueClient
from worker.store import MaskStore

T = TypeVar("T")


def gateway_read(redis_url: str, read: Callable[[QueueClient], Awaitable[T]]) -> T:
    """Run one of the gateway's QueueClient reads from a synchronous test."""

    async def go() -> T:
        queue = QueueClient.from_url(redis_url)
        try:
            return await read(queue)
        finally:
            await queue.aclose()

    return asyncio.run(go())


def store_mask(client: redis.Redis, mask_bytes: bytes, meta: dict[str, Any], tenant: str) -> str:
    """Store a mask for `tenant` with the writes a job queues (RedisJobContext.store_mask, minus the lease)."""
    store = MaskStore(client)
    mask_id, meta_json = store.describe(mask_bytes, meta)
    with client.pipeline(transaction=True) as pipe:
        store.queue_put(pipe, mask_id, mask_bytes, meta_json, tenant)
        pipe.execute()
    return mask_id


class Jobs:
    """Enqueue, cancel and read jobs as the gateway does, on a synchronous client."""

    def __init__(self, client: redis.Redis, tenant: str) -> None:
        self.client, self.tenant = client, tenant

    def enqueue(
        self, job: dict[str, Any], *, tenant: str, kind: str, idempotency_key: str | None = None
    ) -> tuple[str, bool]:
        payload = {"job_id": uuid.uuid4().hex, "tenant": tenant, "job_kind": kind, **job}
        op = scripts.enqueue_job(
            payload, tenant=tenant, kind=kind, now=time.time(), idempotency_key=idempotency_key
        )
        job_id, outcome = scripts.call(self.client, op)
        return job_id, outcome is scripts.Enqueued.created

    def request_cancel(self, job_id: str) -> str | None:
        """The job's state after the request, or None for an unknown job."""
        states = scripts.call(self.client, scripts.cancel_job(job_id, tenant=self.tenant, now=time.time()))
        return None if states is None else states[1].value

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        """The decoded job hash as a dict of its set fields, or None when unknown."""
        job = JobHash.decode(self.client.hgetall(keys.JOB_KEY.format(job_id=job_id)))
        return None if job is None else job.model_dump(mode="json", exclude_none=True)

    def steps(self, job_id: str) -> list[Any]:
        return [json.loads(r) for r in self.client.lrange(keys.JOB_STEPS_KEY.format(job_id=job_id), 0, -1)]


class Masks:
    """Store masks as a job does, read them as the gateway does, delete them with the protocol's script."""

    def __init__(self, client: redis.Redis, redis_url: str) -> None:
        self.client, self.redis_url = client, redis_url
        self.store = MaskStore(client)

    def put(self, mask_bytes: bytes, meta: dict[str, Any], tenant: str) -> str:
        return store_mask(self.client, mask_bytes, meta, tenant)

    def get_bytes(self, mask_id: str, tenant: str) -> bytes:
        return self.store.get_bytes(mask_id, tenant)

    def get_meta(self, mask_id: str, tenant: str) -> dict[str, Any] | None:
        return gateway_read(self.redis_url, lambda q: q.mask_meta(mask_id, tenant))

    def list(self, tenant: str) -> list[dict[str, Any]]:
        return gateway_read(self.redis_url, lambda q: q.list_masks(tenant, 1000))

    def delete(self, mask_id: str, tenant: str) -> scripts.MaskRelease:
        return scripts.call(self.client, scripts.delete_mask(mask_id, tenant=tenant))
