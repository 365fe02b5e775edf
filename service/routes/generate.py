"""POST /v1/generate: generation through a mask, answered whole or as server-sent events."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from protocol import GenerateDelta, GenerateDone, GenerateTask
from service.deps import QueueDep, ServingDep, SettingsDep, TenantDep
from service.errors import error_body, error_responses
from service.limits import GenerationFields, check_generation
from service.schemas import GenerateRequest, GenerateResponse
from service.serving_client import GenerationFailed

router = APIRouter(prefix="/v1", tags=["generate"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
) -> GenerateResponse | StreamingResponse:
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
    return StreamingResponse(_sse(task, events), media_type="text/event-stream", headers=SSE_HEADERS)


def unsent(final: str, sent: str) -> str:
    """What the final text adds to the streamed deltas (nothing when they already hold it all)."""
    return final[len(sent) :] if final.startswith(sent) else ""


def _event(name: str, data: str) -> str:
    return f"event: {name}\ndata: {data}\n\n"


async def _sse(task: GenerateTask, events: AsyncIterator[GenerateDelta | GenerateDone]) -> AsyncIterator[str]:
    """`delta` events, then `done` with the whole response; a failure after the headers went out is a
    final `error` event carrying the error object."""
    sent = ""
    try:
        async for event in events:
            if isinstance(event, GenerateDelta):
                sent += event.text
                yield _event("delta", json.dumps({"text": event.text}))
                continue
            response = GenerateResponse.from_done(task, event)
            if rest := unsent(response.text, sent):  # the deltas always add up to the final text
                yield _event("delta", json.dumps({"text": rest}))
            yield _event("done", response.model_dump_json())
    except GenerationFailed as exc:
        yield _event("error", json.dumps(error_body(exc.info.type, exc.info.message)))
