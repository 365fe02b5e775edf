"""RedisJobContext: worker/context.py's JobContext on Redis.

Every write that matters (a step, a mask, the plot) goes through the job's lease (worker/lease.py), so
a fenced-off worker writes nothing; a side effect outside Redis (an export's rename) runs through
`while_owner`, right after renewing the lease. Events go to the job's stream `JOB_EVENTS_KEY` in the
protocol's layout (protocol/job_hash.py).

`should_cancel` is also the job's clock: past `timeout_s` of wall-clock time it answers True and sets
`timed_out`, so the job stops at its next check like a cancelled one, and the consumer records it as
failed with `timeout_error()` (JobTimeout) rather than cancelled.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
from redis.client import Pipeline

from protocol import JobProgress, keys
from protocol.job_hash import JobHash, event_fields, job_fields
from worker.errors import JobTimeout, LeaseLostError
from worker.lease import Lease
from worker.store import MaskStore

__all__ = ["RedisJobContext", "add_event"]

log = logging.getLogger(__name__)

T = TypeVar("T")


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
        timeout_s: float = float("inf"),
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
        self.timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self.timed_out = False  # set by should_cancel once the deadline has passed

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
        if self._cancel_seen or self.timed_out:
            return True
        now = time.monotonic()
        if now >= self._deadline:
            log.warning("job %s: past its wall-clock limit of %g s; stopping it", self.job_id, self.timeout_s)
            self.timed_out = True
            return True
        if now - self._cancel_checked_at >= self._cancel_poll:
            flag = self.redis.hget(self._job_key, "cancel_requested")
            self._cancel_seen = JobHash.read({"cancel_requested": flag}).cancel_requested
            self._cancel_checked_at = now
        return self._cancel_seen

    def timeout_error(self) -> JobTimeout:
        """The error a job that stopped on its deadline fails with."""
        progress = self._last_progress
        where = f"phase {progress.phase!r}" + (f", step {progress.step}" if progress.step else "")
        return JobTimeout(
            f"job ran past its wall-clock limit of {self.timeout_s:g} s (SELPRUNE_JOB_TIMEOUT_S) and was "
            f"stopped in {where}; submit it with a smaller budget (steps, tokens, datasets)"
        )

    def while_owner(self, action: Callable[[], T]) -> T:
        """Run `action` right after renewing the lease, so this run owns the job for a whole lease TTL
        around it (the action must be quick); LeaseLostError, without running it, if the lease is gone."""
        if not self.lease.renew():
            raise LeaseLostError(f"job {self.job_id}: lease lost; not committing")
        return action()

    def uncount_attempt(self, attempt: int, *, wait_s: float) -> bool:
        """Give back an attempt a Redis outage ended: once Redis answers (retried for up to `wait_s`),
        attempts goes back to `attempt - 1`, under the lease and only if no other start counted since.
        False when Redis stayed away that long or the lease is gone: the attempt stays counted."""

        def give_back(pipe: Pipeline) -> bool:
            counted = JobHash.read({"attempts": pipe.hget(self._job_key, "attempts")}).attempts
            pipe.multi()
            if counted == attempt:
                pipe.hset(self._job_key, mapping=job_fields(attempts=attempt - 1))  # type: ignore[arg-type]
            return counted == attempt

        deadline, delay, given = time.monotonic() + wait_s, 0.05, False
        while True:
            try:
                # The lease may have expired while Redis was away: renew takes it back if nobody holds it.
                given = self.lease.renew() and self.lease.transaction(give_back, self._job_key)[1] is True
                break
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() + delay > deadline:
                    break
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
        counted = "not counted" if given else "counted all the same"
        log.warning("job %s: attempt %d ended by a Redis outage; %s", self.job_id, attempt, counted)
        return given

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
