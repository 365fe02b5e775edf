"""RedisJobContext: worker/context.py's JobContext on Redis.

Every write that matters (a step, a mask, the plot) goes through the job's lease (worker/lease.py), so
a fenced-off worker writes nothing. Events go to the job's stream `JOB_EVENTS_KEY` in the protocol's
layout (protocol/job_hash.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import redis
from redis.client import Pipeline

from protocol import JobProgress, keys
from protocol.job_hash import JobHash, event_fields, job_fields
from worker.errors import LeaseLostError
from worker.lease import Lease
from worker.store import MaskStore

__all__ = ["RedisJobContext", "add_event"]

log = logging.getLogger(__name__)


def add_event(pipe: Pipeline, job_id: str, event: str, data: Mapping[str, Any] | str) -> None:
    """Queue an XADD of one event on the job's events stream (capped at about JOB_EVENTS_MAXLEN)."""
    pipe.xadd(
        keys.JOB_EVENTS_KEY.format(job_id=job_id),
        event_fields(event, data),  # type: ignore[arg-type]  # redis-py's field type is invariant
        maxlen=keys.JOB_EVENTS_MAXLEN,
        approximate=True,
    )


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
            pipe.hset(self._job_key, mapping=job_fields(progress=progress))  # type: ignore[arg-type]
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
            pipe.hset(self._job_key, mapping=job_fields(progress=progress))  # type: ignore[arg-type]
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
            flag = self.redis.hget(self._job_key, "cancel_requested")
            self._cancel_seen = JobHash.read({"cancel_requested": flag}).cancel_requested
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
