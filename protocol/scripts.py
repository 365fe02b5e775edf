"""The operations on shared Redis records that both sides need, each written once as a Lua script.

A script runs atomically, so the gateway and the workers see each record whole: a cancel never
interleaves with a worker taking the job, a mask delete never with another tenant storing the same
mask, and an enqueue claims its idempotency key and queues the job in one step.

Each operation is a function that returns a `ScriptCall` (the script, its keys and arguments, and how
to read its reply); `call` runs it on a synchronous client (the worker, the tests) and `call_async` on
an asyncio one (the gateway). The clients are passed in, so this package never imports redis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from protocol import keys
from protocol.job_hash import JobHash, decode_text, state_event
from protocol.jobs import JobProgress, JobState

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = [
    "MaskRelease",
    "ScriptCall",
    "call",
    "call_async",
    "cancel_job",
    "delete_mask",
    "enqueue_job",
]

T = TypeVar("T")

_FINISHED = ", ".join(f"'{s.value}'" for s in JobState if s.finished)
_JOB_KEY_PREFIX = keys.JOB_KEY.format(job_id="")
assert keys.JOB_KEY == _JOB_KEY_PREFIX + "{job_id}", "ENQUEUE builds job keys from ids by prefix"

# KEYS: job hash, tenant's jobs, all jobs, job stream[, idempotency key].
# ARGV: job id, created_at, idempotency ttl (s), job-key prefix, then the hash's field/value pairs.
# Returns {job id, 1} when queued; {first job id, 0} when the idempotency key names a job that exists.
_ENQUEUE = """
if KEYS[5] then
  local first = redis.call('GET', KEYS[5])
  if first and redis.call('EXISTS', ARGV[4] .. first) == 1 then return {first, 0} end
  redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[3])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('XADD', KEYS[4], '*', 'job_id', ARGV[1])
return {ARGV[1], 1}
"""

# KEYS: job hash, events stream. ARGV: tenant, now, state-event data, events maxlen.
# Sets cancel_requested; a queued job turns cancelled at once, a running one stops at its next check,
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
  return {{st, '{JobState.cancelled.value}'}}
end
return {{st, st}}
"""

# KEYS: tenant's masks, the mask's tenants, mask hash. ARGV: mask id, tenant.
# Drops the tenant's hold; the mask's data goes once no tenant holds it. Returns a MaskRelease.
_DELETE_MASK = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
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


def call(client: redis.Redis, op: ScriptCall[T]) -> T:
    return op.read(client.eval(op.source, len(op.keys), *op.keys, *op.args))


async def call_async(client: redis.asyncio.Redis, op: ScriptCall[T]) -> T:
    return op.read(await client.eval(op.source, len(op.keys), *op.keys, *op.args))


# Operations ---------------------------------------------------------------------------------------
def enqueue_job(
    payload: Mapping[str, Any],
    *,
    tenant: str,
    kind: str,
    now: float,
    progress: JobProgress | None = None,
    idempotency_key: str | None = None,
    idempotency_ttl_s: int = 86400,
) -> ScriptCall[tuple[str, bool]]:
    """Queue a job payload (its wire form, with job_id, tenant and job_kind). The reply is (job id,
    created): with an idempotency key this tenant already used for a job that still exists, that
    job's id and False, and nothing is queued."""
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
    job_keys = [
        keys.JOB_KEY.format(job_id=job_id),
        keys.TENANT_JOBS_KEY.format(tenant=tenant),
        keys.ALL_JOBS_KEY,
        keys.JOB_STREAM,
    ]
    if idempotency_key:
        job_keys.append(keys.IDEMPOTENCY_KEY.format(tenant=tenant, key=idempotency_key))
    args: tuple[str | int, ...] = (job_id, repr(now), idempotency_ttl_s, _JOB_KEY_PREFIX, *fields)
    return ScriptCall(_ENQUEUE, tuple(job_keys), args, _read_enqueued)


def cancel_job(job_id: str, *, tenant: str, now: float) -> ScriptCall[tuple[JobState, JobState] | None]:
    """Ask a job to stop. The reply is (state before, state after), or None when the job is unknown
    or another tenant's."""
    return ScriptCall(
        _CANCEL,
        (keys.JOB_KEY.format(job_id=job_id), keys.JOB_EVENTS_KEY.format(job_id=job_id)),
        (tenant, repr(now), state_event(job_id, JobState.cancelled), keys.JOB_EVENTS_MAXLEN),
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
        ),
        (mask_id, tenant),
        lambda reply: MaskRelease(int(reply)),
    )


def _read_enqueued(reply: Any) -> tuple[str, bool]:
    job_id, created = reply
    return decode_text(job_id), int(created) == 1


def _read_cancelled(reply: Any) -> tuple[JobState, JobState] | None:
    if not reply:
        return None
    before, after = reply
    return JobState(decode_text(before)), JobState(decode_text(after))
