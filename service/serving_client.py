"""ServingClient: the gateway's side of the serving lane, and its only Redis user for generation.

Protocol (names in protocol/keys.py, models in protocol/generate.py):

- a request is XADDed to `GENERATE_STREAM` as {"task": GenerateTask JSON}, stamped with
  `enqueued_at` = now and `deadline` = now + the timeout (a worker skips a task past its deadline);
- the worker RPUSHes GenerateEvent JSON onto `GENERATE_REPLY_KEY`: `delta`s when the task streams,
  then exactly one `done` or `error`. The gateway BLPOPs it in slices shorter than the connection's
  read timeout, and gives up once `timeout_s` passes without an event (for a stream: between two
  events). The reply key is deleted once the reply is complete or abandoned; its TTL, refreshed by
  every push, removes what a disconnected caller leaves behind.

A worker error and a timeout both raise `GenerationFailed` carrying an ErrorInfo; service/errors.py
maps its type to an HTTP status.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from pydantic import TypeAdapter

from protocol import (
    ChatMessage,
    ErrorInfo,
    GenerateDelta,
    GenerateDone,
    GenerateEvent,
    GenerateFailed,
    GenerateTask,
    SamplingParams,
    keys,
)

logger = logging.getLogger(__name__)

TIMEOUT_TYPE = "GenerationTimeout"
_EVENT: TypeAdapter[GenerateDelta | GenerateDone | GenerateFailed] = TypeAdapter(GenerateEvent)
_MIN_BLOCK_S = 0.01  # BLPOP with timeout 0 would block forever


class GenerationFailed(Exception):
    """The worker answered with an error, or nothing answered in time; `info` is what the caller sees."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(f"{info.type}: {info.message}")
        self.info = info


def new_request_id() -> str:
    return uuid.uuid4().hex


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ServingClient:
    def __init__(self, redis: aioredis.Redis, *, timeout_s: float, block_s: float) -> None:
        self.redis = redis
        self.timeout_s = timeout_s
        # One BLPOP waits at most this long; the connection's read timeout (QueueClient.from_url) is
        # 10 s longer, so a quiet wait never looks like a dead connection.
        self.block_s = max(block_s, _MIN_BLOCK_S)

    def task(
        self,
        tenant: str,
        model: str,
        mask_id: str | None,
        sampling: SamplingParams,
        *,
        prompts: Sequence[str] | None = None,
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
            messages=list(messages) if messages is not None else None,
            n=n,
            sampling=sampling,
            stream=stream,
            enqueued_at=now,
            deadline=now + self.timeout_s,
        )

    async def generate(self, task: GenerateTask) -> GenerateDone:
        """Queue the task and wait for its `done`; GenerationFailed for an error or a timeout."""
        async for event in self._events(task, await self._submit(task)):
            if isinstance(event, GenerateDone):
                return event
        raise AssertionError("the reply ended without a done event")  # _events always ends on done

    async def open_stream(self, task: GenerateTask) -> AsyncIterator[GenerateDelta | GenerateDone]:
        """Queue a streaming task and wait for its first event, so an early failure (unknown mask, prompt
        too long, no worker) raises here, before any response header is sent. The iterator yields that
        event and the rest, ending with `done`; a later failure raises GenerationFailed from it."""
        events = self._events(task, await self._submit(task))
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        return _prepend(first, events)

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
    async def _submit(self, task: GenerateTask) -> str:
        entry_id = await self.redis.xadd(
            keys.GENERATE_STREAM,
            {"task": task.model_dump_json()},
            maxlen=keys.GENERATE_STREAM_MAXLEN,
            approximate=True,
        )
        return _s(entry_id)

    async def _events(
        self, task: GenerateTask, entry_id: str
    ) -> AsyncGenerator[GenerateDelta | GenerateDone]:
        """The task's reply events up to `done`; GenerationFailed for an error event or a timeout."""
        key = keys.GENERATE_REPLY_KEY.format(request_id=task.request_id)
        started = False
        try:
            while True:
                raw = await self._pop(key)
                if raw is None:
                    if not started:  # nobody took it: drop the entry so no worker starts it late
                        await self.redis.xdel(keys.GENERATE_STREAM, entry_id)
                    raise GenerationFailed(await self._timeout_info(started))
                started = True
                event = _EVENT.validate_json(raw)
                if isinstance(event, GenerateFailed):
                    raise GenerationFailed(event.error)
                yield event
                if isinstance(event, GenerateDone):
                    return
        finally:
            await self.redis.delete(key)

    async def _pop(self, key: str) -> bytes | None:
        """The next item of the reply list, or None once `timeout_s` passes without one."""
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            got = await self.redis.blpop([key], timeout=max(min(left, self.block_s), _MIN_BLOCK_S))
            if got is not None:
                raw = got[1]
                return raw if isinstance(raw, bytes) else str(raw).encode()
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
) -> AsyncIterator[GenerateDelta | GenerateDone]:
    try:
        yield first
        if isinstance(first, GenerateDone):
            return
        async for event in rest:
            yield event
    finally:
        await rest.aclose()
