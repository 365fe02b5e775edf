"""QueueClient: every Redis command the gateway sends. No other module in service/ talks to Redis.

Layout (names in protocol/keys.py; the worker reads and writes the same keys):

- job hash `JOB_KEY`: laid out and decoded by protocol/job_hash.py (`JobHash`). Step reports (JSON) in
  the list `JOB_STEPS_KEY`, step 0 first.
- job plot `JOB_PLOT_KEY`: PNG bytes of a prune job's trade-off plot, written by the worker per step.
- job events stream `JOB_EVENTS_KEY`: entries with `event` (progress|step|state) and `data` (JSON).
- enqueue, cancel and mask delete are the protocol's scripts (protocol/scripts.py), which the worker
  side shares.
- mask hash `MASK_KEY`: bits (safetensors bytes), meta (JSON of the facts the bits determine); what a
  tenant's job said about the mask (name, job id, params, ...) is that tenant's `TENANT_MASK_META_KEY`.
  The tenants that may see a mask are the sorted set `TENANT_MASKS_KEY` per tenant and the set
  `MASK_TENANTS_KEY` per mask.

Methods return plain data (decoded hashes, lists); routes turn it into response models. Lookups take
the caller's tenant and answer None for another tenant's id, exactly as for an unknown one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from protocol import JobProgress, JobState, keys, scripts
from protocol.job_hash import JobHash

# Exceptions meaning "Redis is unreachable": the error handlers answer 503 for these.
QUEUE_DOWN_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode_hash(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in raw.items()}


@dataclass(frozen=True)
class JobRecord:
    """A job hash (decoded) and its step reports."""

    job_id: str
    job: JobHash
    steps: list[dict[str, Any]]


@dataclass(frozen=True)
class JobPlot:
    """A job's trade-off plot; `png` is None until the worker has rendered one."""

    job_id: str
    kind: str
    png: bytes | None


@dataclass(frozen=True)
class Event:
    """One entry of a job's events stream."""

    id: str
    event: str
    data: str


class QueueClient:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    @classmethod
    def from_url(cls, url: str, *, block_ms: int = 15_000, max_connections: int = 200) -> QueueClient:
        # The read timeout must outlast the events endpoint's XREAD BLOCK: left unset, redis-py falls
        # back to the connect timeout (5 s) and every idle event stream died after 5 s.
        read_timeout = block_ms / 1000 + 10
        # A bounded pool: a burst of streams waits for a connection (up to 5 s, then 503) instead of
        # opening connections until Redis's maxclients locks the workers out too.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=5,
            socket_connect_timeout=5,
            socket_timeout=read_timeout,
            health_check_interval=30,
        )
        return cls(aioredis.Redis.from_pool(pool))  # owns the pool: aclose() closes it

    async def aclose(self) -> None:
        await self.redis.aclose()

    # Health ------------------------------------------------------------------------------------------
    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def worker_count(self, limit: int = 1000) -> int:
        """Live worker heartbeat keys (stops counting at `limit`)."""
        n = 0
        async for _ in self.redis.scan_iter(match=keys.WORKER_HEARTBEAT_PATTERN, count=100):
            n += 1
            if n >= limit:
                break
        return n

    # Jobs --------------------------------------------------------------------------------------------
    async def enqueue(
        self,
        payload: dict[str, Any],
        *,
        progress: dict[str, Any],
        idempotency_key: str | None = None,
        idempotency_ttl_s: int = 86400,
        max_active_jobs: int = 0,
        history_s: float = 7 * 24 * 3600,
    ) -> tuple[str, scripts.Enqueued]:
        """Queue a validated payload (its `job_id`, `job_kind`, `tenant` fields are used): protocol
        `enqueue_job`, with its idempotency, per-tenant cap and listing trim."""
        op = scripts.enqueue_job(
            payload,
            tenant=str(payload["tenant"]),
            kind=str(payload["job_kind"]),
            now=time.time(),
            progress=JobProgress.model_validate(progress),
            idempotency_key=idempotency_key,
            idempotency_ttl_s=idempotency_ttl_s,
            max_active_jobs=max_active_jobs,
            history_s=history_s,
        )
        return await scripts.call_async(self.redis, op)

    async def get_job(self, job_id: str, tenant: str, *, with_steps: bool = True) -> JobRecord | None:
        """The job and its step reports, or None when unknown or another tenant's."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.JOB_KEY.format(job_id=job_id))
            pipe.lrange(keys.JOB_STEPS_KEY.format(job_id=job_id), 0, -1)
            raw, raw_steps = await pipe.execute()
        job = JobHash.decode(raw)
        if job is None or job.tenant != tenant:
            return None
        steps = [json.loads(s) for s in raw_steps] if with_steps else []
        return JobRecord(job_id, job, [s for s in steps if isinstance(s, dict)])

    async def job_plot(self, job_id: str, tenant: str) -> JobPlot | None:
        """The job's trade-off PNG (None until its first step), or None when unknown or another tenant's."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.JOB_KEY.format(job_id=job_id), ["tenant", "kind"])
            pipe.get(keys.JOB_PLOT_KEY.format(job_id=job_id))
            (owner, kind), png = await pipe.execute()
        if owner is None or _s(owner) != tenant:
            return None
        return JobPlot(job_id, _s(kind) if kind is not None else "", png if png is None else bytes(png))

    async def list_jobs(self, tenant: str, state: JobState | None, limit: int) -> list[JobRecord]:
        """The tenant's jobs, newest first, optionally only those in `state` (steps not loaded)."""
        out: list[JobRecord] = []
        page, start = max(limit, 100), 0
        tenant_key = keys.TENANT_JOBS_KEY.format(tenant=tenant)
        while len(out) < limit:
            ids = [_s(i) for i in await self.redis.zrevrange(tenant_key, start, start + page - 1)]
            if not ids:
                break
            start += page
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(keys.JOB_KEY.format(job_id=job_id))
                hashes = await pipe.execute()
            for job_id, raw in zip(ids, hashes, strict=True):
                job = JobHash.decode(raw)
                if job is None or job.tenant != tenant or (state is not None and job.state != state):
                    continue
                out.append(JobRecord(job_id, job, []))
                if len(out) >= limit:
                    break
        return out

    async def cancel(self, job_id: str, tenant: str) -> tuple[JobState, JobState] | None:
        """Ask a job to stop; a queued job is cancelled at once. Returns (state before, state after)."""
        return await scripts.call_async(
            self.redis, scripts.cancel_job(job_id, tenant=tenant, now=time.time())
        )

    async def job_hash(self, job_id: str) -> JobHash | None:
        return JobHash.decode(await self.redis.hgetall(keys.JOB_KEY.format(job_id=job_id)))

    async def read_events(
        self, job_id: str, after: str, *, block_ms: int | None, count: int = 100
    ) -> list[Event]:
        """Events after stream id `after`; waits up to `block_ms` for the first one (None: no wait)."""
        key = keys.JOB_EVENTS_KEY.format(job_id=job_id)
        resp = await self.redis.xread({key: after}, count=count, block=block_ms)
        entries: list[Any] = []
        if isinstance(resp, dict):  # RESP3: {name: [[(id, fields), ...]]}
            streams = [v[0] if v and isinstance(v[0], list) else v for v in resp.values()]
            entries = [e for stream in streams for e in stream]
        else:  # RESP2: [[name, [(id, fields), ...]]]
            entries = [e for _, stream in resp or [] for e in stream]
        events = []
        for entry_id, raw in entries:
            fields = _decode_hash(raw)
            data = fields.get("data", "{}")
            events.append(Event(_s(entry_id), fields.get("event") or _event_name(data), data))
        return events

    # Masks -------------------------------------------------------------------------------------------
    async def list_masks(self, tenant: str, limit: int) -> list[dict[str, Any]]:
        """Meta of the tenant's masks, newest first."""
        tenant_key = keys.TENANT_MASKS_KEY.format(tenant=tenant)
        pairs: list[Any] = await self.redis.zrevrange(tenant_key, 0, limit - 1, withscores=True)
        held = [(_s(i), float(t)) for i, t in pairs]
        async with self.redis.pipeline(transaction=False) as pipe:
            for mask_id, _ in held:
                pipe.hget(keys.MASK_KEY.format(mask_id=mask_id), "meta")
                pipe.get(keys.TENANT_MASK_META_KEY.format(tenant=tenant, mask_id=mask_id))
            raws = await pipe.execute()
        return [
            _meta(mask_id, shared, own, t)
            for (mask_id, t), shared, own in zip(held, raws[::2], raws[1::2], strict=True)
            if shared is not None
        ]

    async def mask_visible(self, mask_id: str, tenant: str) -> bool:
        return await self.redis.zscore(keys.TENANT_MASKS_KEY.format(tenant=tenant), mask_id) is not None

    async def mask_meta(self, mask_id: str, tenant: str) -> dict[str, Any] | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zscore(keys.TENANT_MASKS_KEY.format(tenant=tenant), mask_id)
            pipe.hget(keys.MASK_KEY.format(mask_id=mask_id), "meta")
            pipe.get(keys.TENANT_MASK_META_KEY.format(tenant=tenant, mask_id=mask_id))
            held_since, shared, own = await pipe.execute()
        if held_since is None or shared is None:
            return None
        return _meta(mask_id, shared, own, float(held_since))

    async def mask_bits(self, mask_id: str, tenant: str) -> bytes | None:
        if not await self.mask_visible(mask_id, tenant):
            return None
        raw = await self.redis.hget(keys.MASK_KEY.format(mask_id=mask_id), "bits")
        if raw is None:
            return None
        return raw if isinstance(raw, bytes) else str(raw).encode()

    async def delete_mask(self, mask_id: str, tenant: str) -> bool:
        """Remove the tenant's claim; the mask's data goes once no tenant holds it."""
        op = scripts.delete_mask(mask_id, tenant=tenant)
        return await scripts.call_async(self.redis, op) is not scripts.MaskRelease.not_held

    # Metrics -----------------------------------------------------------------------------------------
    async def queue_depth(self) -> tuple[int, int]:
        """(entries not yet delivered to a worker, entries delivered but not acknowledged)."""
        length = int(await self.redis.xlen(keys.JOB_STREAM))
        try:
            groups = await self.redis.xinfo_groups(keys.JOB_STREAM)
        except Exception:  # no stream yet
            groups = []
        for group in groups:
            info = _decode_hash(group) if isinstance(group, dict) else {}
            if info.get("name") == keys.JOB_GROUP:
                lag = info.get("lag")
                depth = int(lag) if lag not in (None, "", "None") else length
                return depth, int(info.get("pending", 0))
        return length, 0

    async def job_state_counts(self, scan_limit: int) -> dict[str, int]:
        """Jobs by state over the newest `scan_limit` jobs."""
        counts = {s.value: 0 for s in JobState}
        ids = await self.redis.zrevrange(keys.ALL_JOBS_KEY, 0, scan_limit - 1)
        for start in range(0, len(ids), 500):
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids[start : start + 500]:
                    pipe.hget(keys.JOB_KEY.format(job_id=_s(job_id)), "state")
                for state in await pipe.execute():
                    if state is not None:
                        counts[_s(state)] = counts.get(_s(state), 0) + 1
        return counts

    async def durations(self, key: str) -> list[float]:
        out = []
        for raw in await self.redis.lrange(key, 0, -1):
            try:
                out.append(float(_s(raw)))
            except ValueError:
                continue
        return out


def _event_name(data: str) -> str:
    """Event name for an entry without an `event` field: the data's "event"/"type", else progress."""
    try:
        obj = json.loads(data)
    except ValueError:
        return "progress"
    name = (obj.get("event") or obj.get("type")) if isinstance(obj, dict) else None
    return name if isinstance(name, str) else "progress"


def _meta(mask_id: str, shared: Any, own: Any, held_since: float) -> dict[str, Any]:
    """The tenant's meta over the shared one's bit-derived facts (only those: a record written before
    meta was per tenant holds its first writer's name and job, which no other tenant may see);
    `created_at` defaults to when the tenant got the mask."""
    facts = _json_object(shared)
    meta = _json_object(own) | {k: facts[k] for k in keys.MASK_SHARED_META if k in facts}
    meta.setdefault("mask_id", mask_id)
    meta.setdefault("created_at", held_since)
    return meta


def _json_object(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        value = json.loads(_s(raw))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
