"""The operations on shared Redis records that both sides need, each written once as a Lua script.

A script runs atomically, so the gateway and the workers see each record whole: a cancel never
interleaves with a worker taking the job, a mask delete never with another tenant storing the same
mask, and an enqueue claims its idempotency key and queues the job in one step.

Each operation is a function that returns a `ScriptCall` (the script, its keys and arguments, and how
to read its reply); `call` runs it on a synchronous client (the worker, the tests) and `call_async` on
an asyncio one (the gateway). The clients are passed in, so this package never imports redis.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from protocol import keys
from protocol.job_hash import JobHash, decode_text, state_event
from protocol.jobs import JobProgress, JobState

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.client

__all__ = [
    "Enqueued",
    "MaskRelease",
    "ScriptCall",
    "call",
    "call_async",
    "cancel_job",
    "claim_job",
    "delete_mask",
    "enqueue_job",
    "queue_call",
    "release_job",
]

T = TypeVar("T")

_FINISHED = ", ".join(f"'{s.value}'" for s in JobState if s.finished)
_JOB_KEY_PREFIX = keys.JOB_KEY.format(job_id="")
assert keys.JOB_KEY == _JOB_KEY_PREFIX + "{job_id}", "ENQUEUE builds job keys from ids by prefix"

_TENANT_KEY_PREFIX = keys.TENANT_QUEUE_KEY.split("{tenant}")[0]
_QUEUE_SUFFIX = keys.TENANT_QUEUE_KEY.split("{tenant}")[1]
_ACTIVE_SUFFIX = keys.TENANT_ACTIVE_KEY.split("{tenant}")[1]
assert keys.TENANT_ACTIVE_KEY.startswith(_TENANT_KEY_PREFIX), "tenant keys share one prefix"

# KEYS: job hash, tenant's jobs, all jobs, job stream, tenant's queue, waiting tenants, served tenants,
# tenant's active jobs[, idempotency key].
# ARGV: job id, created_at, idempotency ttl (s), job-key prefix, tenant, active cap (0: none), request
# digest, history cutoff (unix seconds), then the hash's field/value pairs.
# Returns {job id, 1} when queued; {first job id, 0} when the idempotency key names a job that exists;
# {first job id, -2} when it names one made from another request; {'', -1} when the tenant is at its cap.
_ENQUEUE = """
if KEYS[9] then
  local first = redis.call('GET', KEYS[9])
  if first then
    local id, digest = string.match(first, '^([^|]*)|?(.*)$')
    if redis.call('EXISTS', ARGV[4] .. id) == 1 then
      if digest ~= ARGV[7] then return {id, -2} end
      return {id, 0}
    end
  end
end
if tonumber(ARGV[6]) > 0 and redis.call('SCARD', KEYS[8]) >= tonumber(ARGV[6]) then return {'', -1} end
if KEYS[9] then redis.call('SET', KEYS[9], ARGV[1] .. '|' .. ARGV[7], 'EX', ARGV[3]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[8])
redis.call('RPUSH', KEYS[5], ARGV[1])
redis.call('SADD', KEYS[8], ARGV[1])
redis.call('ZADD', KEYS[6], 'NX', redis.call('HGET', KEYS[7], ARGV[5]) or '0', ARGV[5])
redis.call('XADD', KEYS[4], '*', 'token', '1')
return {ARGV[1], 1}
"""

# KEYS: entry jobs, waiting tenants, served tenants. ARGV: entry id, now, tenant-key prefix, queue
# suffix, the job id a legacy entry names ('' if none).
# The job a stream entry delivers: the one it delivered before (a reclaimed entry), else the first
# queued job of the tenant served least recently. Returns the job id, or false when none is queued.
_CLAIM = """
local job = redis.call('HGET', KEYS[1], ARGV[1])
if job then return job end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
  return ARGV[5]
end
while true do
  local first = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #first == 0 then return false end
  local tenant = first[1]
  local queue = ARGV[3] .. tenant .. ARGV[4]
  job = redis.call('LPOP', queue)
  if redis.call('LLEN', queue) == 0 then
    redis.call('ZREM', KEYS[2], tenant)
  else
    redis.call('ZADD', KEYS[2], ARGV[2], tenant)
  end
  redis.call('HSET', KEYS[3], tenant, ARGV[2])
  if job then
    redis.call('HSET', KEYS[1], ARGV[1], job)
    return job
  end
end
"""

# KEYS: job hash, entry jobs. ARGV: entry id, job id, tenant-key prefix, active suffix.
# The end of a job's admission: the entry no longer names it and its tenant's cap no longer counts it.
_RELEASE = """
redis.call('HDEL', KEYS[2], ARGV[1])
local tenant = redis.call('HGET', KEYS[1], 'tenant')
if tenant then redis.call('SREM', ARGV[3] .. tenant .. ARGV[4], ARGV[2]) end
return 1
"""

# KEYS: job hash, events stream, tenant's queue, tenant's active jobs. ARGV: tenant, now, state-event
# data, events maxlen, job id.
# Sets cancel_requested; a queued job turns cancelled at once (and leaves its tenant's queue and cap),
# a running one stops at its next check,
# a finished one is left as it is. Returns {state before, state after}, or false for an unknown job or
# one of another tenant.
_CANCEL = f"""
local st = redis.call('HGET', KEYS[1], 'state')
if not st or redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return false end
for _, done in ipairs({{{_FINISHED}}}) do
  if st == done then return {{st, st}} end
end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
if st == '{JobState.queued.value}' then
  redis.call('HSET', KEYS[1], 'state', '{JobState.cancelled.value}', 'finished_at', ARGV[2])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', 'state', 'data', ARGV[3])
  redis.call('LREM', KEYS[3], 0, ARGV[5])
  redis.call('SREM', KEYS[4], ARGV[5])
  return {{st, '{JobState.cancelled.value}'}}
end
return {{st, st}}
"""

# KEYS: tenant's masks, the mask's tenants, mask hash, the tenant's meta of the mask. ARGV: mask id, tenant.
# Drops the tenant's hold and its meta; the mask's data goes once no tenant holds it. Returns a MaskRelease.
_DELETE_MASK = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[4])
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  return 2
end
return 1
"""


@dataclass(frozen=True)
class ScriptCall(Generic[T]):
    """One run of a script: its source, keys and arguments, and the reader of its reply."""

    source: str
    keys: tuple[str, ...]
    args: tuple[str | int | float | bytes, ...]
    read: Callable[[Any], T]


def queue_call(pipe: redis.client.Pipeline, op: ScriptCall[Any]) -> None:
    """Queue `op` on a transaction (its reply is then in the transaction's results)."""
    pipe.eval(op.source, len(op.keys), *op.keys, *op.args)


def call(client: redis.Redis, op: ScriptCall[T]) -> T:
    return op.read(client.eval(op.source, len(op.keys), *op.keys, *op.args))


async def call_async(client: redis.asyncio.Redis, op: ScriptCall[T]) -> T:
    return op.read(await client.eval(op.source, len(op.keys), *op.keys, *op.args))


# Operations ---------------------------------------------------------------------------------------
class Enqueued(Enum):
    """What an enqueue did."""

    created = "created"  # the job is queued
    existing = "existing"  # the idempotency key named a job made from the same request: nothing queued
    key_reused = "key_reused"  # the idempotency key named a job made from another request: nothing queued
    over_quota = "over_quota"  # the tenant holds its cap of unfinished jobs: nothing queued


def enqueue_job(
    payload: Mapping[str, Any],
    *,
    tenant: str,
    kind: str,
    now: float,
    progress: JobProgress | None = None,
    idempotency_key: str | None = None,
    idempotency_ttl_s: int = 86400,
    max_active_jobs: int = 0,
    history_s: float = 7 * 24 * 3600,
) -> ScriptCall[tuple[str, Enqueued]]:
    """Queue a job payload (its wire form, with job_id, tenant and job_kind).

    The reply is (job id, what happened). An idempotency key is bound to the request: the payload less
    its job id. `max_active_jobs` caps the tenant's unfinished jobs (0: no cap). Job listings older than
    `history_s` are trimmed on the way.
    """
    if (payload.get("tenant"), payload.get("job_kind")) != (tenant, kind) or not payload.get("job_id"):
        raise ValueError(
            f"payload is for {payload.get('tenant')}/{payload.get('job_kind')} "
            f"(job {payload.get('job_id')}), not {tenant}/{kind}"
        )
    job_id = str(payload["job_id"])
    record = JobHash(
        state=JobState.queued,
        kind=kind,
        tenant=tenant,
        payload=dict(payload),
        created_at=now,
        progress=progress or JobProgress(),
    )
    fields = [item for pair in record.encode().items() for item in pair]
    request = json.dumps({k: v for k, v in payload.items() if k != "job_id"}, sort_keys=True)
    digest = hashlib.sha256(request.encode()).hexdigest()[:32]
    job_keys = [
        keys.JOB_KEY.format(job_id=job_id),
        keys.TENANT_JOBS_KEY.format(tenant=tenant),
        keys.ALL_JOBS_KEY,
        keys.JOB_STREAM,
        keys.TENANT_QUEUE_KEY.format(tenant=tenant),
        keys.TENANTS_WAITING_KEY,
        keys.TENANTS_SERVED_KEY,
        keys.TENANT_ACTIVE_KEY.format(tenant=tenant),
    ]
    if idempotency_key:
        job_keys.append(keys.IDEMPOTENCY_KEY.format(tenant=tenant, key=idempotency_key))
    args: tuple[str | int, ...] = (
        job_id,
        repr(now),
        idempotency_ttl_s,
        _JOB_KEY_PREFIX,
        tenant,
        max_active_jobs,
        digest,
        repr(now - history_s),
        *fields,
    )
    return ScriptCall(_ENQUEUE, tuple(job_keys), args, _read_enqueued)


def claim_job(entry_id: str, *, now: float, named_job: str = "") -> ScriptCall[str | None]:
    """The job stream entry `entry_id` delivers (see _CLAIM); None when no job is queued.
    `named_job` is the job an entry written before fair admission names in its own fields."""
    return ScriptCall(
        _CLAIM,
        (keys.ENTRY_JOBS_KEY, keys.TENANTS_WAITING_KEY, keys.TENANTS_SERVED_KEY),
        (entry_id, repr(now), _TENANT_KEY_PREFIX, _QUEUE_SUFFIX, named_job),
        lambda reply: None if not reply else decode_text(reply),
    )


def release_job(entry_id: str, job_id: str) -> ScriptCall[int]:
    """Forget which job an entry delivered and drop the job from its tenant's cap (queue it on the
    transaction that settles the job, with `queue_call`)."""
    return ScriptCall(
        _RELEASE,
        (keys.JOB_KEY.format(job_id=job_id), keys.ENTRY_JOBS_KEY),
        (entry_id, job_id, _TENANT_KEY_PREFIX, _ACTIVE_SUFFIX),
        int,
    )


def cancel_job(job_id: str, *, tenant: str, now: float) -> ScriptCall[tuple[JobState, JobState] | None]:
    """Ask a job to stop. The reply is (state before, state after), or None when the job is unknown
    or another tenant's."""
    return ScriptCall(
        _CANCEL,
        (
            keys.JOB_KEY.format(job_id=job_id),
            keys.JOB_EVENTS_KEY.format(job_id=job_id),
            keys.TENANT_QUEUE_KEY.format(tenant=tenant),
            keys.TENANT_ACTIVE_KEY.format(tenant=tenant),
        ),
        (tenant, repr(now), state_event(job_id, JobState.cancelled), keys.JOB_EVENTS_MAXLEN, job_id),
        _read_cancelled,
    )


class MaskRelease(IntEnum):
    """What deleting a tenant's mask did."""

    not_held = 0  # the tenant did not hold it: nothing changed
    released = 1  # the tenant let go; other tenants still hold the mask
    deleted = 2  # nobody holds it now: its data is gone


def delete_mask(mask_id: str, *, tenant: str) -> ScriptCall[MaskRelease]:
    """Drop `tenant`'s hold on a mask, and the mask itself once no tenant holds it."""
    return ScriptCall(
        _DELETE_MASK,
        (
            keys.TENANT_MASKS_KEY.format(tenant=tenant),
            keys.MASK_TENANTS_KEY.format(mask_id=mask_id),
            keys.MASK_KEY.format(mask_id=mask_id),
            keys.TENANT_MASK_META_KEY.format(tenant=tenant, mask_id=mask_id),
        ),
        (mask_id, tenant),
        lambda reply: MaskRelease(int(reply)),
    )


_ENQUEUE_REPLIES = {
    1: Enqueued.created,
    0: Enqueued.existing,
    -2: Enqueued.key_reused,
    -1: Enqueued.over_quota,
}


def _read_enqueued(reply: Any) -> tuple[str, Enqueued]:
    job_id, code = reply
    return decode_text(job_id), _ENQUEUE_REPLIES[int(code)]


def _read_cancelled(reply: Any) -> tuple[JobState, JobState] | None:
    if not reply:
        return None
    before, after = reply
    return JobState(decode_text(before)), JobState(decode_text(after))
