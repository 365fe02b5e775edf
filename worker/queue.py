"""The job queue: a Redis stream with one consumer group, a hash per job, and a lease per running job.

Contract (key names in protocol/keys.py). The gateway writes and reads these itself, without importing
this module, so keep the two in step:

Job hash `JOB_KEY`, all values strings:
    state             queued | running | succeeded | failed | cancelled (payloads.JobState)
    kind              prune | evaluate | export (the payload's job_kind)
    tenant            the tenant that submitted it
    payload           JSON of the job model (`model_dump(mode="json")`), incl. job_id and tenant
    created_at        unix seconds (repr of a float); started_at (of the latest attempt), finished_at
    progress          JSON payloads.JobProgress; enqueue writes {"phase": "queued", ...}
    attempts          starts so far ("0" when queued); a job picked up again after max_attempts
                      starts is failed as RetriesExhausted and its id LPUSHed on DEAD_LETTER_KEY
    worker            consumer name of the worker that started the latest attempt
    result            JSON object returned by the job (on succeeded)
    error             JSON {"type", "message"} (payloads.ErrorInfo) on failed
    cancel_requested  "1" once a cancel was asked for
Steps `JOB_STEPS_KEY` (list of JSON step reports), checkpoint `JOB_CHECKPOINT_KEY` (mask bytes after
the last step), events `JOB_EVENTS_KEY` (stream of {"event": progress|step|state, "data": JSON}).

Enqueue, one MULTI/EXEC after claiming the idempotency key (if any) with SET NX EX:
    HSET JOB_KEY (state=queued, kind, tenant, payload, created_at, progress, attempts=0)
    ZADD TENANT_JOBS_KEY and ALL_JOBS_KEY {job_id: created_at}
    XADD JOB_STREAM * job_id <job_id>          (the stream entry holds only the id)
Cancel (`CANCEL_LUA`, atomic): HSET cancel_requested=1; a queued job turns cancelled at once; a
running one stops at its next `should_cancel()` check; a finished one is left as it is.

Worker loop (`Worker.run`): XAUTOCLAIM entries idle past visibility_timeout (a dead worker's), else
XREADGROUP COUNT 1. Per entry: take the lease (SET NX PX; held by a live worker -> leave the entry);
then, in one transaction guarded by the lease: finished -> ack; cancel_requested -> cancelled; attempts
+1 above max_attempts -> failed RetriesExhausted and LPUSH DEAD_LETTER_KEY; else running. Run the job
with a RedisJobContext while a heartbeat thread renews the lease and touches the entry (XCLAIM, so
its idle time stays low). Write the outcome, ack (XACK + XDEL: the stream only holds waiting and
running jobs), expire the job's keys after job_ttl_seconds, release the lease. A worker killed
mid-job never acks, so after visibility_timeout and lease expiry another worker claims the entry and
the job resumes from its checkpoint. Failures are data: a failed job stores its error and is not
retried; only crashes are (up to max_attempts).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from pydantic import TypeAdapter, ValidationError
from redis.client import Pipeline

from protocol import AnyJob, EvaluateJob, ExportJob, JobProgress, JobState, PruneJob, keys
from selprune_core.errors import CancelledError, SelPruneError
from worker.context import JobContext
from worker.errors import (
    JobError,
    JobPayloadError,
    LeaseLostError,
    WorkerFatalError,
    is_cuda_oom,
    is_device_failure,
    release_cuda_cache,
    to_error_info,
)
from worker.loop import ensure_group, require_bytes_client, run_turns
from worker.redis_context import Lease, RedisJobContext, add_event
from worker.settings import WorkerSettings
from worker.store import MaskStore

__all__ = ["CANCEL_LUA", "Job", "JobQueue", "Runner", "Worker", "ensure_group"]

log = logging.getLogger(__name__)

Job = PruneJob | EvaluateJob | ExportJob
Runner = Callable[[Job, JobContext], dict[str, Any]]

_JOB_ADAPTER: TypeAdapter[Job] = TypeAdapter(AnyJob)
_FINISHED = {s.value for s in JobState if s.finished}

# KEYS: job hash, events stream. ARGV: now, state-event data (JSON), events maxlen.
# Returns the state after the call, or false for an unknown job.
CANCEL_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return state end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', 'state', 'data', ARGV[2])
  return 'cancelled'
end
return state
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobQueue:
    """Enqueue, cancel and inspect jobs (the gateway has its own equivalent of the same commands)."""

    def __init__(self, redis_client: redis.Redis, *, idempotency_ttl_seconds: int = 86400) -> None:
        self.redis = redis_client
        self.idempotency_ttl = idempotency_ttl_seconds
        self._cancel = redis_client.register_script(CANCEL_LUA)

    def enqueue(
        self, job: dict[str, Any], *, tenant: str, kind: str, idempotency_key: str | None = None
    ) -> tuple[str, bool]:
        """Queue a job payload. Returns (job id, created); created is False when `idempotency_key`
        was already used by this tenant, and then the first job's id comes back and nothing is queued."""
        payload = {"job_id": uuid.uuid4().hex, "tenant": tenant, "job_kind": kind, **job}
        job_id = str(payload["job_id"])
        if (payload["tenant"], payload["job_kind"]) != (tenant, kind):
            raise ValueError(f"payload is for {payload['tenant']}/{payload['job_kind']}, not {tenant}/{kind}")
        idem = keys.IDEMPOTENCY_KEY.format(tenant=tenant, key=idempotency_key) if idempotency_key else None
        if idem and not self.redis.set(idem, job_id, nx=True, ex=self.idempotency_ttl):
            existing = self.redis.get(idem)
            if existing is not None and self.redis.exists(keys.JOB_KEY.format(job_id=_text(existing))):
                return _text(existing), False
            self.redis.set(idem, job_id, ex=self.idempotency_ttl)  # the job it named has expired
        now = time.time()
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    keys.JOB_KEY.format(job_id=job_id),
                    mapping={
                        "state": JobState.queued.value,
                        "kind": kind,
                        "tenant": tenant,
                        "payload": json.dumps(payload),
                        "created_at": repr(now),
                        "progress": JobProgress().model_dump_json(),
                        "attempts": "0",
                    },
                )
                pipe.zadd(keys.TENANT_JOBS_KEY.format(tenant=tenant), {job_id: now})
                pipe.zadd(keys.ALL_JOBS_KEY, {job_id: now})
                pipe.xadd(keys.JOB_STREAM, {"job_id": job_id})
                pipe.execute()
        except BaseException:
            if idem:
                self.redis.delete(idem)
            raise
        return job_id, True

    def request_cancel(self, job_id: str) -> str | None:
        """Ask a job to stop. Returns its state afterwards (a queued job is cancelled at once), or
        None for an unknown job."""
        data = json.dumps({"type": "state", "job_id": job_id, "state": JobState.cancelled.value})
        state = self._cancel(
            keys=[keys.JOB_KEY.format(job_id=job_id), keys.JOB_EVENTS_KEY.format(job_id=job_id)],
            args=[repr(time.time()), data, keys.JOB_EVENTS_MAXLEN],
        )
        return None if state is None else _text(state)

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        """The job hash, decoded: JSON fields parsed, attempts as int. None when unknown."""
        raw = self.redis.hgetall(keys.JOB_KEY.format(job_id=job_id))
        if not raw:
            return None
        job: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
        for field in ("payload", "progress", "result", "error"):
            if field in job:
                job[field] = json.loads(job[field])
        job["attempts"] = int(job.get("attempts", 0))
        return job

    def steps(self, job_id: str) -> list[Any]:
        return [json.loads(r) for r in self.redis.lrange(keys.JOB_STEPS_KEY.format(job_id=job_id), 0, -1)]


class _Heartbeat(threading.Thread):
    """Renews the lease every lease_seconds/3, touches the stream entry, refreshes the worker key."""

    def __init__(self, worker: Worker, lease: Lease, entry_id: str, job_id: str) -> None:
        super().__init__(name=f"selprune-heartbeat-{job_id}", daemon=True)
        self.worker, self.lease, self.entry_id, self.job_id = worker, lease, entry_id, job_id
        self._halt = threading.Event()

    def run(self) -> None:
        redis_client = self.worker.redis
        while not self._halt.wait(self.worker.settings.lease_seconds / 3):
            try:
                if not self.lease.lost.is_set():
                    if self.lease.renew():
                        # Reset the entry's idle time so no other worker bothers to claim it.
                        redis_client.xclaim(
                            keys.JOB_STREAM, keys.JOB_GROUP, self.worker.id, 0, [self.entry_id], justid=True
                        )
                    else:
                        log.warning(
                            "job %s: lease taken by %s; fencing off", self.job_id, self.lease.holder()
                        )
                self.worker.beat(self.job_id)
            except Exception:  # a Redis hiccup must not kill the thread; the next beat retries
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)

    def stop(self) -> None:
        self._halt.set()
        self.join()


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
                log.info("worker %s: claimed stale entry %s", self.id, _text(entry_id))
                return self._entry(entry_id, fields)
            if _text(next_start) == "0-0":
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
        job_id = (fields or {}).get(b"job_id", b"")
        return _text(entry_id), _text(job_id)

    # One job ----------------------------------------------------------------------------------------
    def _process(self, entry_id: str, job_id: str) -> None:
        if not job_id or not self.redis.exists(keys.JOB_KEY.format(job_id=job_id)):
            log.warning("worker %s: entry %s names no job (%r); dropping it", self.id, entry_id, job_id)
            with self.redis.pipeline(transaction=True) as pipe:
                self._ack(pipe, entry_id)
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

    def _begin(self, lease: Lease, entry_id: str, job_id: str) -> tuple[int, str, str] | None:
        """Move the job to running; or settle it (finished, cancelled, retries exhausted) and return None."""
        job_key = keys.JOB_KEY.format(job_id=job_id)
        now = repr(time.time())

        def begin(pipe: Pipeline) -> tuple[int, str, str] | None:
            raw = pipe.hmget(job_key, ["state", "cancel_requested", "attempts", "payload", "tenant"])
            state, cancel, attempts_raw, payload, tenant = (None if v is None else _text(v) for v in raw)
            pipe.multi()
            if state in _FINISHED:
                self._settle(pipe, entry_id, job_id)
                return None
            if cancel == "1":
                pipe.hset(job_key, mapping={"state": JobState.cancelled.value, "finished_at": now})
                self._settle(pipe, entry_id, job_id, JobState.cancelled)
                return None
            attempts = int(attempts_raw or 0) + 1
            if attempts > self.settings.max_attempts:
                error = {
                    "type": "RetriesExhausted",
                    "message": f"job started {attempts - 1} times without finishing (the worker died each time)",
                }
                pipe.hset(
                    job_key,
                    mapping={"state": JobState.failed.value, "finished_at": now, "error": json.dumps(error)},
                )
                pipe.lpush(keys.DEAD_LETTER_KEY, job_id)
                self._settle(pipe, entry_id, job_id, JobState.failed, error)
                return None
            pipe.hset(
                job_key,
                mapping={
                    "state": JobState.running.value,
                    "started_at": now,
                    "attempts": str(attempts),
                    "worker": self.id,
                },
            )
            add_event(pipe, job_id, "state", {"type": "state", "job_id": job_id, "state": "running"})
            return attempts, payload or "", tenant or ""

        held, started = lease.transaction(begin, job_key)
        if not held or started is None:
            return None
        log.info("job %s: started (attempt %d/%d)", job_id, started[0], self.settings.max_attempts)
        return started

    def _execute(
        self, lease: Lease, entry_id: str, job_id: str, attempt: int, payload: str, tenant: str
    ) -> None:
        try:
            job = _JOB_ADAPTER.validate_json(payload)
            if job.tenant != tenant or job.job_id != job_id:
                raise JobPayloadError(
                    f"payload names job {job.job_id} of {job.tenant}, not {job_id} of {tenant}"
                )
        except (ValidationError, JobPayloadError) as exc:
            bad = exc if isinstance(exc, JobPayloadError) else JobPayloadError(str(exc))
            self._finish(lease, entry_id, job_id, JobState.failed, error=to_error_info(bad))
            return
        ctx = RedisJobContext(self.redis, job_id=job_id, tenant=tenant, lease=lease, store=self.store)
        heartbeat = _Heartbeat(self, lease, entry_id, job_id)
        heartbeat.start()
        t0 = time.monotonic()
        state: JobState | None = None  # None: fenced off, write nothing
        error: dict[str, Any] | None = None
        result_json: str | None = None
        fatal: WorkerFatalError | None = None
        try:
            result_json = json.dumps(self.runner(job, ctx))
            state = JobState.succeeded
        except LeaseLostError:
            pass
        except CancelledError:
            if not lease.lost.is_set():
                state = JobState.cancelled
        except (JobError, SelPruneError, ValidationError) as exc:  # the caller's fault: no retry
            state, error = JobState.failed, to_error_info(exc)
        except (redis.RedisError, WorkerFatalError):
            raise  # not the job's fault: leave it unacked, another attempt picks it up
        except Exception as exc:
            state, error = JobState.failed, to_error_info(exc)
            if is_cuda_oom(exc):
                log.warning("job %s: CUDA out of memory", job_id)
                release_cuda_cache()
            elif is_device_failure(exc):
                log.error("job %s: CUDA failure; the worker will exit", job_id, exc_info=True)
                fatal = WorkerFatalError(f"CUDA failure in job {job_id}: {exc}")
            else:
                log.exception("job %s: failed with an unexpected error", job_id)
        finally:
            heartbeat.stop()
        seconds = time.monotonic() - t0
        if state is None or not self._finish(
            lease,
            entry_id,
            job_id,
            state,
            result=result_json,
            error=error,
            seconds=seconds if state is JobState.succeeded else None,
        ):
            log.warning("job %s: lease lost to %s; leaving the job to it", job_id, lease.holder())
        else:
            log.info("job %s: %s in %.1f s (attempt %d)", job_id, state.value, seconds, attempt)
        if fatal is not None:
            raise fatal

    def _finish(
        self,
        lease: Lease,
        entry_id: str,
        job_id: str,
        state: JobState,
        *,
        result: str | None = None,
        error: dict[str, Any] | None = None,
        seconds: float | None = None,
    ) -> bool:
        """Write the outcome, ack and expire, if the lease is still ours; False otherwise."""
        fields: dict[Any, Any] = {"state": state.value, "finished_at": repr(time.time())}
        if result is not None:
            fields["result"] = result
        if error is not None:
            fields["error"] = json.dumps(error)

        def finish(pipe: Pipeline) -> None:
            pipe.multi()
            pipe.hset(keys.JOB_KEY.format(job_id=job_id), mapping=fields)
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
            data: dict[str, Any] = {"type": "state", "job_id": job_id, "state": state.value}
            if error is not None:
                data["error"] = error
            add_event(pipe, job_id, "state", data)
        self._ack(pipe, entry_id)
        ttl = self.settings.job_ttl_seconds
        for key in (keys.JOB_KEY, keys.JOB_STEPS_KEY, keys.JOB_EVENTS_KEY, keys.JOB_PLOT_KEY):
            pipe.expire(key.format(job_id=job_id), ttl)
        pipe.delete(keys.JOB_CHECKPOINT_KEY.format(job_id=job_id))

    def _ack(self, pipe: Pipeline, entry_id: str) -> None:
        # XDEL too: the stream then holds exactly the waiting and running jobs (its length is the depth).
        pipe.xack(keys.JOB_STREAM, keys.JOB_GROUP, entry_id)
        pipe.xdel(keys.JOB_STREAM, entry_id)
