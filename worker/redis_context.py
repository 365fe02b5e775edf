"""The job lease, and RedisJobContext: worker/context.py's JobContext on Redis.

A worker runs a job only while it holds the job's lease: `JOB_LEASE_KEY` set with SET NX PX to a
token unique to this run, renewed by a heartbeat thread. A worker that stalls past the TTL (a long
pause, a partition) can find the lease taken by another worker; from then on it is *fenced off*:
every write that matters (a step, the final state) is a WATCH/MULTI transaction that first checks the
lease still holds our token, so a fenced-off worker never appends a duplicate step or overwrites the
new holder's result.

Events go to the job's stream `JOB_EVENTS_KEY` as entries {"event": progress|step|state, "data": JSON}.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.client import Pipeline

from protocol import JobProgress, keys
from worker.errors import LeaseLostError
from worker.store import MaskStore

__all__ = ["Lease", "RedisJobContext", "add_event"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Renew our lease; take it back if it expired and nobody else took it (nobody ran the job meanwhile:
# running needs the lease). KEYS: lease. ARGV: token, ttl ms. Returns 1 if held after the call.
_RENEW_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# Delete the lease only if it is still ours. KEYS: lease. ARGV: token.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def add_event(pipe: Pipeline, job_id: str, event: str, data: dict[str, Any]) -> None:
    """Queue an XADD of one event on the job's events stream (capped at about JOB_EVENTS_MAXLEN)."""
    pipe.xadd(
        keys.JOB_EVENTS_KEY.format(job_id=job_id),
        {"event": event, "data": json.dumps(data)},
        maxlen=keys.JOB_EVENTS_MAXLEN,
        approximate=True,
    )


class Lease:
    """This worker's claim on one job. `lost` is set once the lease turns out to be someone else's."""

    def __init__(self, redis_client: redis.Redis, job_id: str, owner: str, ttl_seconds: float) -> None:
        self.redis = redis_client
        self.key = keys.JOB_LEASE_KEY.format(job_id=job_id)
        self.token = f"{owner}:{secrets.token_hex(4)}"  # unique per run, even for the same worker
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.lost = threading.Event()
        self._renew = redis_client.register_script(_RENEW_LUA)
        self._release = redis_client.register_script(_RELEASE_LUA)

    def acquire(self) -> bool:
        """Take the lease if nobody holds it."""
        return bool(self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def holder(self) -> str | None:
        raw = self.redis.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw

    def renew(self) -> bool:
        """Extend the TTL; False (and `lost` set) when another worker holds the lease now."""
        if self.lost.is_set():
            return False
        if self._renew(keys=[self.key], args=[self.token, self.ttl_ms]) == 1:
            return True
        self.lost.set()
        return False

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.token])

    def transaction(self, func: Callable[[Pipeline], T], *also_watch: str) -> tuple[bool, T | None]:
        """Run `func` in a WATCH/MULTI transaction on the lease (and `also_watch` keys), only while
        the lease is ours. `func` may read in immediate mode, then calls `pipe.multi()` and queues
        writes; it is retried if a watched key changes. Returns (held, func's value)."""

        while True:
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.key, *also_watch)  # type: ignore[no-untyped-call]  # untyped in redis-py
                    raw = pipe.get(self.key)
                    if (raw.decode() if isinstance(raw, bytes) else raw) != self.token:
                        self.lost.set()
                        return False, None
                    value = func(pipe)
                    pipe.execute()
                    return True, value
                except redis.WatchError:
                    continue  # a watched key changed (a renewal, a cancel request): read again


class RedisJobContext:
    """What a job function sees while it runs on a Redis worker (see worker/context.py)."""

    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        job_id: str,
        tenant: str,
        lease: Lease,
        store: MaskStore,
        cancel_poll_seconds: float = 0.5,
    ) -> None:
        self.redis = redis_client
        self.job_id = job_id
        self.tenant = tenant
        self.lease = lease
        self.store = store
        self._job_key = keys.JOB_KEY.format(job_id=job_id)
        self._steps_key = keys.JOB_STEPS_KEY.format(job_id=job_id)
        self._checkpoint_key = keys.JOB_CHECKPOINT_KEY.format(job_id=job_id)
        self._plot_key = keys.JOB_PLOT_KEY.format(job_id=job_id)
        self._cancel_poll = cancel_poll_seconds
        self._cancel_seen = False
        self._cancel_checked_at = float("-inf")
        self._last_progress = JobProgress(phase="running")
        self._step_started = time.monotonic()

    def progress(self, progress: JobProgress) -> None:
        self._last_progress = progress
        if self.lease.lost.is_set():
            return  # fenced off: the job's new holder reports its progress
        data = progress.model_dump(mode="json")
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self._job_key, "progress", json.dumps(data))
            add_event(pipe, self.job_id, "progress", {"type": "progress", **data})
            pipe.execute()

    def step_done(self, report: dict[str, Any], checkpoint: bytes) -> None:
        step = report.get("step")
        if isinstance(step, int):
            self._last_progress = self._last_progress.model_copy(update={"step": step})
        progress = self._last_progress.model_dump(mode="json")
        seconds = time.monotonic() - self._step_started

        def write(pipe: Pipeline) -> None:
            pipe.multi()
            pipe.rpush(self._steps_key, json.dumps(report))
            pipe.set(self._checkpoint_key, checkpoint)
            pipe.hset(self._job_key, "progress", json.dumps(progress))
            add_event(pipe, self.job_id, "step", {"type": "step", "report": report})
            pipe.lpush(keys.STEP_DURATIONS_KEY, f"{seconds:.3f}")
            pipe.ltrim(keys.STEP_DURATIONS_KEY, 0, keys.DURATIONS_KEPT - 1)

        held, _ = self.lease.transaction(write)
        if not held:
            raise LeaseLostError(f"job {self.job_id}: lease lost; step not recorded")
        self._step_started = time.monotonic()

    def store_plot(self, png: bytes) -> None:
        """Replace the job's PNG; a fenced-off worker writes nothing (its plot could outlive the job)."""

        def write(pipe: Pipeline) -> None:
            pipe.multi()
            pipe.set(self._plot_key, png)

        self.lease.transaction(write)

    def completed_steps(self) -> list[dict[str, Any]]:
        reports = [json.loads(raw) for raw in self.redis.lrange(self._steps_key, 0, -1)]
        return [r for r in reports if isinstance(r, dict)]

    def checkpoint(self) -> bytes | None:
        raw = self.redis.get(self._checkpoint_key)
        return raw.encode() if isinstance(raw, str) else raw

    def should_cancel(self) -> bool:
        if self.lease.lost.is_set():
            return True  # fencing: another worker runs this job now
        now = time.monotonic()
        if not self._cancel_seen and now - self._cancel_checked_at >= self._cancel_poll:
            self._cancel_seen = self.redis.hget(self._job_key, "cancel_requested") in (b"1", "1")
            self._cancel_checked_at = now
        return self._cancel_seen

    def store_mask(self, mask_bytes: bytes, meta: dict[str, Any]) -> str:
        mask_id, meta_json = self.store.describe(mask_bytes, meta)

        def write(pipe: Pipeline) -> None:
            pipe.multi()
            self.store.queue_put(pipe, mask_id, mask_bytes, meta_json, self.tenant)

        held, _ = self.lease.transaction(write)  # a fenced-off worker must not publish a mask
        if not held:
            raise LeaseLostError(f"job {self.job_id}: lease lost; mask not stored")
        return mask_id

    def load_mask(self, mask_id: str) -> bytes:
        return self.store.get_bytes(mask_id, self.tenant)
