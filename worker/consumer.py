"""The job consumer: takes jobs off the job stream one at a time and runs them (non-forking).

The records it works on (the job hash, its events, the stream) are laid out in protocol/ (keys.py,
job_hash.py); enqueue and cancel are protocol/scripts.py's, shared with the gateway.

Loop (`Worker.run`): XAUTOCLAIM entries idle past visibility_timeout (a dead worker's), else
XREADGROUP COUNT 1. Per entry: take the lease (worker/lease.py; held by a live worker -> leave the
entry); then, in one transaction guarded by the lease: finished -> ack; cancel_requested -> cancelled;
attempts +1 above max_attempts -> failed RetriesExhausted and LPUSH DEAD_LETTER_KEY; else running.
Run the job with a RedisJobContext while a LeaseKeeper renews the lease and touches the entry (XCLAIM,
so its idle time stays low). Write the outcome, ack (XACK + XDEL: the stream only holds waiting and
running jobs), expire the job's keys after job_ttl_seconds, release the lease. A worker killed
mid-job never acks, so after visibility_timeout and lease expiry another worker claims the entry and
the job resumes from its checkpoint. Failures are data: a failed job stores its error and is not
retried; only crashes are (up to max_attempts). What counts as which is worker/errors.py's `classify`.

An attempt counts when it starts, so a worker that dies mid-job has used one. An attempt that ends on
a Redis outage (`is_outage`: connection lost, timeouts) is the infrastructure's doing, not the job's:
once Redis answers again the worker gives the attempt back (attempts -1, under the lease) before the
entry is left for a retry, so blips never dead-letter a job. Each attempt runs for at most
job_timeout_s; past it the job stops at its next check and fails as JobTimeout.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import TypeAdapter, ValidationError
from redis.client import Pipeline

from protocol import AnyJob, EvaluateJob, ExportJob, JobState, PruneJob, keys, scripts
from protocol.job_hash import JobHash, decode_text, job_fields, state_event
from worker.context import JobContext
from worker.errors import (
    JobPayloadError,
    JobTimeout,
    Outcome,
    WorkerFatalError,
    classify,
    is_outage,
    to_error_info,
)
from worker.lease import Lease, LeaseKeeper
from worker.loop import ensure_group, require_bytes_client, run_turns
from worker.redis_context import RedisJobContext, add_event
from worker.settings import WorkerSettings
from worker.store import MaskStore

__all__ = ["Job", "Runner", "Worker", "ensure_group"]

log = logging.getLogger(__name__)

Job = PruneJob | EvaluateJob | ExportJob
Runner = Callable[[Job, JobContext], dict[str, Any]]

_JOB_ADAPTER: TypeAdapter[Job] = TypeAdapter(AnyJob)


class Worker:
    """Takes jobs from the stream one at a time and runs them with `runner` (non-forking)."""

    def __init__(self, settings: WorkerSettings, redis_client: redis.Redis, runner: Runner) -> None:
        require_bytes_client(redis_client, "worker")
        self.settings = settings
        self.redis = redis_client
        self.runner = runner
        self.id = settings.worker_id
        self.store = MaskStore(redis_client)
        self._beat_key = keys.WORKER_HEARTBEAT_KEY.format(worker_id=self.id)
        self._beat_ttl_ms = int(1000 * max(settings.lease_seconds, 3 * settings.poll_block_ms / 1000))

    # Loop -------------------------------------------------------------------------------------------
    def run(self, burst: bool = False, stop_event: threading.Event | None = None) -> None:
        """Work until `stop_event` is set (checked between jobs), or, with burst, until no job is left."""
        stop = stop_event or threading.Event()
        ensure_group(self.redis)
        log.info("worker %s: waiting for jobs on %s", self.id, keys.JOB_STREAM)

        def turn() -> bool:
            self.beat(None)
            entry = self._claim_stale() or self._read_new(None if burst else self.settings.poll_block_ms)
            if entry is not None:
                self._process(*entry)
            return entry is not None or not burst

        run_turns(
            f"worker {self.id}",
            stop,
            turn,
            ensure_group=lambda: ensure_group(self.redis),
            redis_client=self.redis,
            heartbeat_key=self._beat_key,
            retry_outages=not burst,
        )
        log.info("worker %s: stopped", self.id)

    def beat(self, job_id: str | None) -> None:
        """Announce this worker (and its current job) with a TTL'd key; /readyz looks for these."""
        info = {"worker_id": self.id, "job_id": job_id, "at": time.time()}
        self.redis.set(self._beat_key, json.dumps(info), px=self._beat_ttl_ms)

    def _claim_stale(self) -> tuple[str, str] | None:
        """An entry idle past visibility_timeout (its worker died), now ours; None if there is none."""
        min_idle_ms = int(self.settings.visibility_timeout * 1000)
        start: Any = "0-0"
        for _ in range(100):  # each call scans at most 10 pending entries
            reply: Any = self.redis.xautoclaim(
                keys.JOB_STREAM, keys.JOB_GROUP, self.id, min_idle_ms, start_id=start, count=1
            )
            next_start, claimed = reply[0], reply[1]
            if claimed:
                entry_id, fields = claimed[0]
                log.info("worker %s: claimed stale entry %s", self.id, decode_text(entry_id))
                return self._entry(entry_id, fields)
            if decode_text(next_start) == "0-0":
                return None
            start = next_start
        return None

    def _read_new(self, block_ms: int | None) -> tuple[str, str] | None:
        reply: Any = self.redis.xreadgroup(  # RESP2 reply: [[stream, [(id, fields)]]]
            keys.JOB_GROUP, self.id, {keys.JOB_STREAM: ">"}, count=1, block=block_ms
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                return self._entry(entry_id, fields)
        return None

    def _entry(self, entry_id: Any, fields: Any) -> tuple[str, str]:
        """The entry and the job it delivers: chosen fairly across tenants when first taken, the same
        job when the entry is reclaimed from a dead worker."""
        entry = decode_text(entry_id)
        named = decode_text((fields or {}).get(b"job_id", b""))  # entries from before fair admission
        job_id = scripts.call(self.redis, scripts.claim_job(entry, now=time.time(), named_job=named))
        return entry, job_id or ""

    # One job ----------------------------------------------------------------------------------------
    def _process(self, entry_id: str, job_id: str) -> None:
        if not job_id or not self.redis.exists(keys.JOB_KEY.format(job_id=job_id)):
            log.warning("worker %s: entry %s delivers no job (%r); dropping it", self.id, entry_id, job_id)
            with self.redis.pipeline(transaction=True) as pipe:
                self._ack(pipe, entry_id, job_id)
                pipe.execute()
            return
        lease = Lease(self.redis, job_id, self.id, self.settings.lease_seconds)
        if not lease.acquire():
            log.debug("job %s: leased by %s; leaving it", job_id, lease.holder())
            return
        try:
            started = self._begin(lease, entry_id, job_id)
            if started is not None:
                self._execute(lease, entry_id, job_id, *started)
        finally:
            lease.release()

    def _begin(self, lease: Lease, entry_id: str, job_id: str) -> tuple[int, JobHash] | None:
        """Move the job to running; or settle it (finished, cancelled, retries exhausted) and return None."""
        job_key = keys.JOB_KEY.format(job_id=job_id)
        now = time.time()

        def begin(pipe: Pipeline) -> tuple[int, JobHash] | None:
            record = JobHash.decode(pipe.hgetall(job_key)) or JobHash()
            pipe.multi()
            if record.state.finished:
                self._settle(pipe, entry_id, job_id)
                return None
            if record.cancel_requested:
                pipe.hset(job_key, mapping=job_fields(state=JobState.cancelled, finished_at=now))  # type: ignore[arg-type]
                self._settle(pipe, entry_id, job_id, JobState.cancelled)
                return None
            attempt = record.attempts + 1
            if attempt > self.settings.max_attempts:
                error = {
                    "type": "RetriesExhausted",
                    "message": f"job started {attempt - 1} times without finishing (the worker died each time)",
                }
                failed = job_fields(state=JobState.failed, finished_at=now, error=error)
                pipe.hset(job_key, mapping=failed)  # type: ignore[arg-type]
                pipe.lpush(keys.DEAD_LETTER_KEY, job_id)
                pipe.ltrim(keys.DEAD_LETTER_KEY, 0, keys.DEAD_LETTER_KEPT - 1)
                self._settle(pipe, entry_id, job_id, JobState.failed, error)
                return None
            running = job_fields(state=JobState.running, started_at=now, attempts=attempt, worker=self.id)
            pipe.hset(job_key, mapping=running)  # type: ignore[arg-type]
            add_event(pipe, job_id, "state", state_event(job_id, JobState.running))
            return attempt, record

        held, started = lease.transaction(begin, job_key)
        if not held or started is None:
            return None
        log.info("job %s: started (attempt %d/%d)", job_id, started[0], self.settings.max_attempts)
        return started

    def _execute(self, lease: Lease, entry_id: str, job_id: str, attempt: int, record: JobHash) -> None:
        try:
            job = _JOB_ADAPTER.validate_python(record.payload)
            if job.tenant != record.tenant or job.job_id != job_id:
                raise JobPayloadError(
                    f"payload names job {job.job_id} of {job.tenant}, not {job_id} of {record.tenant}"
                )
        except (ValidationError, JobPayloadError) as exc:
            bad = exc if isinstance(exc, JobPayloadError) else JobPayloadError(str(exc))
            self._finish(lease, entry_id, job_id, JobState.failed, to_error_info(bad))
            return
        ctx = RedisJobContext(
            self.redis,
            job_id=job_id,
            tenant=record.tenant,
            lease=lease,
            store=self.store,
            timeout_s=self.settings.job_timeout_s,
        )
        interval = self.settings.lease_seconds / 3
        t0 = time.monotonic()
        try:
            with LeaseKeeper(
                lease, job_id, interval, lambda renewed: self._beat_job(entry_id, job_id, renewed)
            ):
                ran = self._run(job, ctx, lease)
            seconds = time.monotonic() - t0
            finished = ran.state is not None and self._finish(
                lease,
                entry_id,
                job_id,
                ran.state,
                ran.error,
                result=ran.result,
                seconds=seconds if ran.state is JobState.succeeded else None,
            )
        except Exception as exc:
            if is_outage(exc):  # Redis went away mid-job or while writing the outcome: not the job's fault
                ctx.uncount_attempt(attempt, wait_s=self.settings.lease_seconds)
            raise
        if not finished:
            log.warning("job %s: lease lost to %s; leaving the job to it", job_id, lease.holder())
        else:
            assert ran.state is not None
            log.info("job %s: %s in %.1f s (attempt %d)", job_id, ran.state.value, seconds, attempt)
        if ran.fatal is not None:
            raise ran.fatal

    def _run(self, job: Job, ctx: RedisJobContext, lease: Lease) -> _Ran:
        """Run the job and say how it ended; an infrastructure error propagates (the job is retried)."""
        try:
            return _Ran(JobState.succeeded, result=job_fields(result=self.runner(job, ctx))["result"])
        except Exception as exc:
            outcome = classify(exc)
            if outcome is Outcome.infrastructure:
                raise  # not the job's fault: leave it unacked, another attempt picks it up
            timeout = ctx.timeout_error() if ctx.timed_out else None
            return _ran_after(job.job_id, exc, outcome, fenced=lease.lost.is_set(), timeout=timeout)

    def _beat_job(self, entry_id: str, job_id: str, renewed: bool) -> None:
        if renewed:  # reset the entry's idle time so no other worker bothers to claim it
            self.redis.xclaim(keys.JOB_STREAM, keys.JOB_GROUP, self.id, 0, [entry_id], justid=True)
        self.beat(job_id)

    def _finish(
        self,
        lease: Lease,
        entry_id: str,
        job_id: str,
        state: JobState,
        error: dict[str, Any] | None = None,
        *,
        result: str | None = None,
        seconds: float | None = None,
    ) -> bool:
        """Write the outcome, ack and expire, if the lease is still ours; False otherwise."""
        fields = job_fields(state=state, finished_at=time.time(), error=error)
        if result is not None:
            fields["result"] = result

        def finish(pipe: Pipeline) -> None:
            pipe.multi()
            pipe.hset(keys.JOB_KEY.format(job_id=job_id), mapping=fields)  # type: ignore[arg-type]
            if seconds is not None:
                pipe.lpush(keys.JOB_DURATIONS_KEY, f"{seconds:.3f}")
                pipe.ltrim(keys.JOB_DURATIONS_KEY, 0, keys.DURATIONS_KEPT - 1)
            self._settle(pipe, entry_id, job_id, state, error)
            pipe.delete(lease.key)

        held, _ = lease.transaction(finish)
        return held

    def _settle(
        self,
        pipe: Pipeline,
        entry_id: str,
        job_id: str,
        state: JobState | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        """Queue the end of a job's life: state event, ack, expiry of its keys, checkpoint dropped."""
        if state is not None:
            add_event(pipe, job_id, "state", state_event(job_id, state, error))
        self._ack(pipe, entry_id, job_id)
        ttl = self.settings.job_ttl_seconds
        for key in (keys.JOB_KEY, keys.JOB_STEPS_KEY, keys.JOB_EVENTS_KEY, keys.JOB_PLOT_KEY):
            pipe.expire(key.format(job_id=job_id), ttl)
        pipe.delete(keys.JOB_CHECKPOINT_KEY.format(job_id=job_id))

    def _ack(self, pipe: Pipeline, entry_id: str, job_id: str) -> None:
        # XDEL too: the stream then holds exactly the waiting and running jobs (its length is the depth).
        pipe.xack(keys.JOB_STREAM, keys.JOB_GROUP, entry_id)
        pipe.xdel(keys.JOB_STREAM, entry_id)
        scripts.queue_call(pipe, scripts.release_job(entry_id, job_id))


@dataclass(frozen=True)
class _Ran:
    """How a job's run ended. `state` None: fenced off, write nothing."""

    state: JobState | None
    error: dict[str, Any] | None = None
    result: str | None = None  # the job's return value, encoded for the hash
    fatal: WorkerFatalError | None = None  # raised once the outcome is written: the worker exits


def _ran_after(
    job_id: str, exc: Exception, outcome: Outcome, *, fenced: bool, timeout: JobTimeout | None = None
) -> _Ran:
    """The outcome to record. `timeout`: the job's clock ran out, so its stop is a failure, not a cancel."""
    if outcome is Outcome.fenced or (outcome is Outcome.cancelled and fenced):
        return _Ran(None)
    if outcome is Outcome.cancelled and timeout is not None:
        log.warning("job %s: %s", job_id, timeout)
        return _Ran(JobState.failed, to_error_info(timeout))
    if outcome is Outcome.cancelled:
        return _Ran(JobState.cancelled)
    error = to_error_info(exc)
    if outcome is Outcome.out_of_memory:
        log.warning("job %s: CUDA out of memory", job_id)
    elif outcome is Outcome.device_failure:
        log.error("job %s: CUDA failure; the worker will exit", job_id, exc_info=exc)
        return _Ran(JobState.failed, error, fatal=WorkerFatalError(f"CUDA failure in job {job_id}: {exc}"))
    elif outcome is Outcome.internal:
        log.error("job %s: failed with an unexpected error", job_id, exc_info=exc)
    return _Ran(JobState.failed, error)
