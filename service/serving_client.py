"""ServingClient: the gateway's side of the serving lane, and its only Redis user for generation.

Protocol (names in protocol/keys.py, models in protocol/generate.py):

- admission: while a request is in flight its rows are held in the tenant's `GENERATE_INFLIGHT_KEY`
  (member "<request_id>:<rows>", score = when the hold expires, refreshed while a reply streams); a
  request that would take the tenant past `max_tenant_rows` is refused 429 with Retry-After, so one
  tenant cannot fill the lane. A stream already holding `GENERATE_STREAM_MAXLEN` unread requests
  refuses new ones (503, Retry-After): nothing queued is ever trimmed away;
- a request is XADDed to `GENERATE_STREAM` as {"task": GenerateTask JSON}, stamped with
  `enqueued_at` = now and `deadline` = now + the timeout (a worker skips a task past its deadline);
- the worker RPUSHes GenerateEvent JSON onto `GENERATE_REPLY_KEY`: `delta`s when the task streams,
  then exactly one `done` or `error`. The gateway BLPOPs it in slices shorter than the connection's
  read timeout, and gives up once `timeout_s` passes without an event (for a stream: between two
  events). The reply key is deleted once the reply is complete or abandoned; its TTL, refreshed by
  every push, removes what a disconnected caller leaves behind;
- when the gateway stops waiting before the final event (the client disconnected, or the wait timed
  out) it adds the request id to `GENERATE_CANCELLED_KEY`; serving workers drop its rows between decode
  steps, or skip it if it was not yet admitted.

`one_shot` takes the same path for classification and fill-mask (entry field the task's `stream_field`,
one reply event; each image or input is a held row).

A worker error and a timeout both raise `GenerationFailed` carrying an ErrorInfo; service/errors.py
maps its type to an HTTP status. `GenerationRefused`, a GenerationFailed with its own status (429,
503, a worker's rejection of the caller's input), is answered by the routes with that status (both in
service/serving_errors.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
import redis.asyncio as aioredis
from pydantic import TypeAdapter
from redis.exceptions import RedisError

from protocol import (
    ChatMessage,
    ClassifyTask,
    ErrorInfo,
    FillMaskTask,
    GenerateDelta,
    GenerateDone,
    GenerateEvent,
    GenerateFailed,
    GenerateTask,
    SamplingParams,
    keys,
)
from service.serving_errors import TIMEOUT_TYPE, GenerationFailed, GenerationRefused, failure

logger = logging.getLogger(__name__)

_EVENT: TypeAdapter[GenerateDelta | GenerateDone | GenerateFailed] = TypeAdapter(GenerateEvent)
_MIN_BLOCK_S = 0.01  # BLPOP with timeout 0 would block forever
_DISCONNECT_POLL_S = 1.0  # a caller that may disconnect is checked at least this often while waiting
_HOLD_REFRESH_S = 30.0  # a streaming request refreshes its in-flight hold after this long
RETRY_AFTER_BUSY_S = 1  # Retry-After of a 429: a tenant's rows free up as its generations end
RETRY_AFTER_FULL_S = 5  # Retry-After of a 503: the lane has a backlog of GENERATE_STREAM_MAXLEN requests

Disconnected = Callable[[], Awaitable[bool]]  # e.g. starlette's Request.is_disconnected
OneShot = ClassifyTask | FillMaskTask  # answered with one event
Queued = GenerateTask | OneShot  # what the lane carries; each holds `rows` of its tenant's cap
DoneT = TypeVar("DoneT")


class _CallerGone(Exception):
    """The caller disconnected while we waited for the worker."""


def new_request_id() -> str:
    return uuid.uuid4().hex


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _held_rows(member: Any) -> int:
    """Rows of an in-flight member "<request_id>:<rows>" (0 for anything else)."""
    _, _, rows = _s(member).rpartition(":")
    return int(rows) if rows.isdigit() else 0


class ServingClient:
    def __init__(self, redis: aioredis.Redis, *, timeout_s: float, block_s: float) -> None:
        self.redis = redis
        self.timeout_s = timeout_s
        # One BLPOP waits at most this long; the connection's read timeout (QueueClient.from_url) is
        # 10 s longer, so a quiet wait never looks like a dead connection.
        self.block_s = max(block_s, _MIN_BLOCK_S)
        # An in-flight hold outlives the longest quiet wait by a minute, so only a dead gateway's expire.
        self.hold_s = timeout_s + 60.0

    def task(
        self,
        tenant: str,
        model: str,
        mask_id: str | None,
        sampling: SamplingParams,
        *,
        prompts: Sequence[str] | None = None,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        messages: Sequence[ChatMessage] | None = None,
        n: int = 1,
        stream: bool = False,
    ) -> GenerateTask:
        """A task with a fresh request id, stamped now, with this client's deadline."""
        now = time.time()
        return GenerateTask(
            request_id=new_request_id(),
            tenant=tenant,
            model=model,
            mask_id=mask_id,
            prompts=list(prompts) if prompts is not None else None,
            prompt_ids=[list(ids) for ids in prompt_ids] if prompt_ids is not None else None,
            messages=list(messages) if messages is not None else None,
            n=n,
            sampling=sampling,
            stream=stream,
            enqueued_at=now,
            deadline=now + self.timeout_s,
        )

    async def generate(
        self, task: GenerateTask, *, max_tenant_rows: int, disconnected: Disconnected | None = None
    ) -> GenerateDone:
        """Queue the task and wait for its `done`; GenerationFailed for an error or a timeout,
        GenerationRefused when refused. `disconnected`, polled while waiting, cancels the generation
        once it says the caller is gone."""
        async with aclosing(self._events(task, max_tenant_rows, disconnected)) as events:
            async for event in events:
                if isinstance(event, GenerateDone):
                    return event
        info = ErrorInfo(
            type="ClientClosedRequest", message="the caller went away; the generation was cancelled"
        )
        raise GenerationRefused(499, info)

    async def open_stream(
        self, task: GenerateTask, *, max_tenant_rows: int
    ) -> AsyncGenerator[GenerateDelta | GenerateDone]:
        """Queue a streaming task and wait for its first event, so an early failure (unknown mask, prompt
        too long, no worker, a refusal) raises here, before any response header is sent. The generator
        yields that event and the rest, ending with `done`; a later failure raises GenerationFailed from
        it. Closing it early (the client went away) cancels the generation on the worker."""
        events = self._events(task, max_tenant_rows, None)
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        return _prepend(first, events)

    async def one_shot(
        self,
        task: OneShot,
        events: TypeAdapter[DoneT | GenerateFailed],
        *,
        max_tenant_rows: int,
        disconnected: Disconnected | None = None,
    ) -> DoneT:
        """Queue a classification or fill-mask and wait for its one reply (read by `events`); raises as
        `generate` does."""
        key = keys.GENERATE_REPLY_KEY.format(request_id=task.request_id)
        held = finished = False
        entry_id: str | None = None
        try:
            await self._hold(task, max_tenant_rows)
            held = True
            entry_id = await self._submit(task)
            raw = await self._pop(key, disconnected)
            if raw is None:
                raise GenerationFailed(await self._timeout_info(False))
            finished = True
            event = events.validate_json(raw)
            if isinstance(event, GenerateFailed):
                raise failure(event.error)
            return event
        except _CallerGone:
            gone = "the caller went away; the request was cancelled"
            raise GenerationRefused(499, ErrorInfo(type="ClientClosedRequest", message=gone)) from None
        finally:
            with anyio.CancelScope(shield=True):
                await self._release(
                    task, key, held=held, entry_id=entry_id, finished=finished, started=finished
                )

    async def servers(self, limit: int = 100) -> list[dict[str, Any]]:
        """Heartbeats of the live serving workers (JSON: worker_id, models, at)."""
        names = []
        async for name in self.redis.scan_iter(match=keys.SERVER_HEARTBEAT_PATTERN, count=100):
            names.append(name)
            if len(names) >= limit:
                break
        out = []
        for raw in await self.redis.mget(names) if names else []:
            try:
                beat = json.loads(_s(raw)) if raw is not None else None
            except ValueError:
                beat = None
            out.append(beat if isinstance(beat, dict) else {})
        return out

    async def waiting(self) -> int:
        """Requests in the stream not yet read by a serving worker (read entries are deleted)."""
        return int(await self.redis.xlen(keys.GENERATE_STREAM))

    # Plumbing ----------------------------------------------------------------------------------------
    async def _events(
        self, task: GenerateTask, max_tenant_rows: int, disconnected: Disconnected | None
    ) -> AsyncGenerator[GenerateDelta | GenerateDone]:
        """The task's reply events up to `done`; GenerationFailed for an error event or a timeout. Holds
        the task's rows in the tenant's in-flight set from before the XADD until the reply ends, and
        cancels the task on the worker when it stops before the final event."""
        key = keys.GENERATE_REPLY_KEY.format(request_id=task.request_id)
        held = False
        entry_id: str | None = None
        started = finished = False
        try:
            await self._hold(task, max_tenant_rows)
            held = True
            entry_id = await self._submit(task)
            refreshed = time.monotonic()
            while True:
                raw = await self._pop(key, disconnected)
                if raw is None:
                    raise GenerationFailed(await self._timeout_info(started))
                started = True
                event = _EVENT.validate_json(raw)
                if isinstance(event, GenerateFailed):
                    finished = True
                    raise failure(event.error)
                finished = isinstance(event, GenerateDone)
                yield event
                if finished:
                    return
                if time.monotonic() - refreshed >= _HOLD_REFRESH_S:
                    await self._refresh_hold(task)
                    refreshed = time.monotonic()
        except _CallerGone:
            logger.info("request %s: the caller went away; cancelling it", task.request_id)
        finally:
            # Runs on cancellation too (a streaming client that disconnects cancels its task): shielded,
            # so the hold is released and the worker told even then.
            with anyio.CancelScope(shield=True):
                await self._release(
                    task, key, held=held, entry_id=entry_id, finished=finished, started=started
                )

    async def _hold(self, task: Queued, cap: int) -> None:
        """Count the task's rows in its tenant's in-flight set, or refuse it: 429 past `cap`."""
        if task.rows > cap:
            what = "completions" if isinstance(task, GenerateTask) else task.row_noun
            message = (
                f"the request asks for {task.rows} {what}; a tenant may have at most {cap} in flight "
                "(SELPRUNE_MAX_INFLIGHT_ROWS_PER_TENANT)"
            )
            raise GenerationRefused(422, ErrorInfo(type="LimitExceeded", message=message))
        key = keys.GENERATE_INFLIGHT_KEY.format(tenant=task.tenant)
        member = f"{task.request_id}:{task.rows}"
        now = time.time()
        # Add first, then count what the set holds: two racing requests may both be refused near the cap,
        # but the tenant never gets past it.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zadd(key, {member: now + self.hold_s})
            pipe.zrange(key, 0, -1)
            pipe.expire(key, math.ceil(self.hold_s))
            _, _, members, _ = await pipe.execute()
        held = sum(_held_rows(m) for m in members)
        if held > cap:
            await self.redis.zrem(key, member)
            message = (
                f"this tenant has {held - task.rows} generation rows in flight and asks for {task.rows} more; "
                f"the limit is {cap} (SELPRUNE_MAX_INFLIGHT_ROWS_PER_TENANT); retry once some finish"
            )
            info = ErrorInfo(type="TooManyRequests", message=message)
            raise GenerationRefused(429, info, retry_after_s=RETRY_AFTER_BUSY_S)

    async def _refresh_hold(self, task: GenerateTask) -> None:
        key = keys.GENERATE_INFLIGHT_KEY.format(tenant=task.tenant)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {f"{task.request_id}:{task.rows}": time.time() + self.hold_s}, xx=True)
            pipe.expire(key, math.ceil(self.hold_s))
            await pipe.execute()

    async def _submit(self, task: Queued) -> str:
        """XADD the task, or refuse it (503) when the stream already holds its cap of unread requests.
        Never trims: an approximate MAXLEN would drop the oldest requests, which may be other tenants'."""
        waiting = await self.waiting()
        if waiting >= keys.GENERATE_STREAM_MAXLEN:
            message = (
                f"{waiting} generation requests are already waiting for a serving worker; "
                f"retry in {RETRY_AFTER_FULL_S} s"
            )
            info = ErrorInfo(type="ServingQueueFull", message=message)
            raise GenerationRefused(503, info, retry_after_s=RETRY_AFTER_FULL_S)
        field = "task" if isinstance(task, GenerateTask) else task.stream_field
        entry_id = await self.redis.xadd(keys.GENERATE_STREAM, {field: task.model_dump_json()})
        return _s(entry_id)

    async def _release(
        self, task: Queued, key: str, *, held: bool, entry_id: str | None, finished: bool, started: bool
    ) -> None:
        """Delete the reply list and the in-flight hold; a request abandoned before its final event is
        withdrawn from the stream if no worker read it yet, and cancelled on the worker otherwise."""
        now = time.time()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(key)
                if held:
                    inflight = keys.GENERATE_INFLIGHT_KEY.format(tenant=task.tenant)
                    pipe.zrem(inflight, f"{task.request_id}:{task.rows}")
                if entry_id is not None and not finished:
                    if not started:  # nobody answered yet: drop the entry so no worker starts it late
                        pipe.xdel(keys.GENERATE_STREAM, entry_id)
                    pipe.zadd(
                        keys.GENERATE_CANCELLED_KEY, {task.request_id: now + keys.GENERATE_CANCEL_TTL_S}
                    )
                    pipe.zremrangebyscore(keys.GENERATE_CANCELLED_KEY, "-inf", now)
                await pipe.execute()
        except RedisError as exc:  # the hold expires on its own; the original error matters more
            logger.warning("request %s: could not release its serving state: %s", task.request_id, exc)

    async def _pop(self, key: str, disconnected: Disconnected | None) -> bytes | None:
        """The next item of the reply list, or None once `timeout_s` passes without one; _CallerGone
        when `disconnected` says the caller left."""
        deadline = time.monotonic() + self.timeout_s
        block = self.block_s if disconnected is None else min(self.block_s, _DISCONNECT_POLL_S)
        while (left := deadline - time.monotonic()) > 0:
            got = await self.redis.blpop([key], timeout=max(min(left, block), _MIN_BLOCK_S))
            if got is not None:
                raw = got[1]
                return raw if isinstance(raw, bytes) else str(raw).encode()
            if disconnected is not None and await disconnected():
                raise _CallerGone()
        return None

    async def _timeout_info(self, started: bool) -> ErrorInfo:
        waited = f"{self.timeout_s:g} s"
        if started:
            message = f"the serving worker sent nothing more for {waited}; the generation was abandoned"
        elif not (servers := await self.servers()):
            message = (
                f"no answer within {waited}: no serving worker is running "
                "(start one with SELPRUNE_ROLES including serve)"
            )
        else:
            message = (
                f"no answer within {waited} from the {len(servers)} serving worker(s) running; "
                "they may be busy or stuck, retry later"
            )
        logger.warning("generation timed out: %s", message)
        return ErrorInfo(type=TIMEOUT_TYPE, message=message)


async def _prepend(
    first: GenerateDelta | GenerateDone, rest: AsyncGenerator[GenerateDelta | GenerateDone]
) -> AsyncGenerator[GenerateDelta | GenerateDone]:
    try:
        yield first
        if isinstance(first, GenerateDone):
            return
        async for event in rest:
            yield event
    finally:
        await rest.aclose()
