"""POST /v1/generate: generation through a mask, answered whole or as server-sent events."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

from fastapi import APIRouter

from protocol import GenerateDelta, GenerateDone, GenerateTask
from service.deltas import unsent
from service.deps import QueueDep, ServingDep, SettingsDep, TenantDep
from service.errors import error_body, error_responses
from service.limits import GenerationFields, check_generation
from service.schemas import GenerateRequest, GenerateResponse
from service.serving_client import GenerationFailed
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
        **error_responses(400, 401, 404, 413, 422, 503, 504),
    },
)
async def generate(
    body: GenerateRequest, settings: SettingsDep, queue: QueueDep, serving: ServingDep, tenant: TenantDep
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
    task = serving.task(
        tenant,
        model,
        body.mask_id,
        body.sampling(seed),
        prompts=[body.prompt] if body.prompt is not None else None,
        messages=body.messages,
        stream=body.stream,
    )
    if not body.stream:
        return GenerateResponse.from_done(task, await serving.generate(task))
    events = await serving.open_stream(task)
    return EventStreamResponse(_sse(task, events))


async def _sse(task: GenerateTask, events: AsyncIterator[GenerateDelta | GenerateDone]) -> AsyncIterator[str]:
    """`delta` events, then `done` with the whole response; a failure after the headers went out is a
    final `error` event carrying the error object."""
    sent = ""
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
