"""POST /v1/generate: generation through a mask, answered whole or as server-sent events."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from pydantic import ValidationError

from protocol import GenerateDelta, GenerateDone, GenerateTask
from service.deltas import unsent
from service.deps import QueueDep, ServingDep, SettingsDep, TenantDep
from service.errors import ApiError, error_body, error_responses, validation_message
from service.limits import GenerationFields, check_generation
from service.schemas import GenerateRequest, GenerateResponse
from service.serving_errors import GenerationFailed, GenerationRefused
from service.sse import EventStreamResponse, format_event

router = APIRouter(prefix="/v1", tags=["generate"])


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "with stream: `delta` events {text}, then `done` (this response) or `error`",
        },
        **error_responses(400, 401, 404, 413, 422, 429, 503, 504),
    },
)
async def generate(
    body: GenerateRequest,
    request: Request,
    settings: SettingsDep,
    queue: QueueDep,
    serving: ServingDep,
    tenant: TenantDep,
) -> GenerateResponse | EventStreamResponse:
    """Generate text from a prompt or chat messages, through a mask when `mask_id` is set."""
    model = await check_generation(
        queue,
        settings,
        tenant,
        model=body.model,
        mask_id=body.mask_id,
        texts=body.texts(),
        max_new_tokens=body.max_new_tokens,
        rows=1,
        stop=body.stop,
        fields=GenerationFields(prompt="prompt" if body.prompt is not None else "messages"),
    )
    # Sampling without a seed gets one drawn here, so any answer can be reproduced from the response.
    seed = body.seed if body.seed is not None or body.temperature == 0 else secrets.randbelow(2**31)
    try:
        task = serving.task(
            tenant,
            model,
            body.mask_id,
            body.sampling(seed),
            prompts=[body.prompt] if body.prompt is not None else None,
            messages=body.messages,
            stream=body.stream,
        )
    except ValidationError as exc:  # the request passed its own model, so this is a contract bound
        raise ApiError(422, "ValidationError", validation_message(list(exc.errors()))) from None
    cap = settings.max_inflight_rows_per_tenant
    try:
        if not body.stream:
            done = await serving.generate(task, max_tenant_rows=cap, disconnected=request.is_disconnected)
            return GenerateResponse.from_done(task, done)
        events = await serving.open_stream(task, max_tenant_rows=cap)
    except GenerationRefused as exc:  # the tenant's cap, a full lane, input the worker rejected
        raise ApiError(exc.status, exc.info.type, exc.info.message, exc.headers) from None
    return EventStreamResponse(_sse(task, events))


async def _sse(
    task: GenerateTask, events: AsyncGenerator[GenerateDelta | GenerateDone]
) -> AsyncIterator[str]:
    """`delta` events, then `done` with the whole response; a failure after the headers went out is a
    final `error` event carrying the error object. Closing this stream (the client went away) closes
    `events`, which cancels the generation on the worker."""
    sent = ""
    async with aclosing(events):
        try:
            async for event in events:
                if isinstance(event, GenerateDelta):
                    sent += event.text
                    yield format_event(json.dumps({"text": event.text}), event="delta")
                    continue
                response = GenerateResponse.from_done(task, event)
                if rest := unsent(response.text, sent):  # the deltas always add up to the final text
                    yield format_event(json.dumps({"text": rest}), event="delta")
                yield format_event(response.model_dump_json(), event="done")
        except GenerationFailed as exc:
            yield format_event(json.dumps(error_body(exc.info.type, exc.info.message)), event="error")
