"""OpenAI-compatible routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models.

`model` names a base model or `<model>@<mask_id>`, so any OpenAI client generates through a mask by
model name. Streams are `data: <chunk>` lines ending with `data: [DONE]`; a failure after the headers
went out is a last `data: {"error": {...}}`, as OpenAI's own streams do.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import aclosing, contextmanager
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError

from protocol import GenerateDelta, GenerateDone
from protocol.generate import MAX_NEW_TOKENS
from service.deltas import unsent
from service.deps import QueueDep, ServingDep, SettingsDep, TenantDep
from service.errors import ApiError, error_body, error_responses, validation_message
from service.limits import GenerationFields, check_generation
from service.openai_schemas import (
    COMPLETION_MAX_TOKENS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIRequest,
    Usage,
)
from service.queue_client import QueueClient
from service.serving_errors import GenerationFailed, GenerationRefused
from service.settings import GatewaySettings
from service.sse import EventStreamResponse, format_event

router = APIRouter(prefix="/v1", tags=["openai"])

_STARTED = int(time.time())  # `created` of the base models
_STREAM: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "with stream: chunks, then [DONE]"}
}
Events = AsyncGenerator[GenerateDelta | GenerateDone]


def split_model(model: str, settings: GatewaySettings) -> tuple[str, str | None]:
    """(base model, mask id) of a request's `model`: a configured model as is, else `<model>@<mask_id>`."""
    base, sep, mask_id = model.rpartition("@")
    if model in settings.models or not (sep and base and mask_id):
        return model, None
    return base, mask_id


async def _check(
    body: OpenAIRequest,
    settings: GatewaySettings,
    queue: QueueClient,
    tenant: str,
    *,
    texts: Sequence[str],
    max_new_tokens: int,
    rows: int,
    fields: GenerationFields,
) -> tuple[str, str | None]:
    """The (base model, mask id) to run, once the request passed every check."""
    if (problem := body.unsupported()) is not None:
        raise ApiError(422, "UnsupportedParameter", problem)
    base, mask_id = split_model(body.model, settings)
    await check_generation(
        queue,
        settings,
        tenant,
        model=base,
        mask_id=mask_id,
        texts=texts,
        max_new_tokens=max_new_tokens,
        rows=rows,
        stop=body.stops(),
        fields=fields,
    )
    return base, mask_id


@contextmanager
def _refusals(*, building: bool = False) -> Iterator[None]:
    """A refusal (tenant cap, full lane, input the worker rejected) answered with its status; while
    `building` the task, a contract bound the request broke is a 422 too."""
    try:
        yield
    except ValidationError as exc:
        if not building:
            raise
        raise ApiError(422, "ValidationError", validation_message(list(exc.errors()))) from None
    except GenerationRefused as exc:
        raise ApiError(exc.status, exc.info.type, exc.info.message, exc.headers) from None


@router.post(
    "/completions",
    response_model=Completion,
    responses={**_STREAM, **error_responses(400, 401, 404, 413, 429, 503, 504)},
)
async def completions(
    body: CompletionRequest,
    request: Request,
    settings: SettingsDep,
    queue: QueueDep,
    serving: ServingDep,
    tenant: TenantDep,
) -> Completion | EventStreamResponse:
    """OpenAI's text completions: each prompt (text or token ids) continued n times; with `logprobs`,
    each token's log-probability and top alternatives, and with `echo` the prompt's tokens too."""
    prompts, prompt_ids, n = body.prompts(), body.prompt_ids(), body.n or 1
    max_tokens = body.max_tokens or COMPLETION_MAX_TOKENS
    fields = GenerationFields(prompt="prompt", max_tokens="max_tokens")
    # The schema admits text prompts or token-id prompts, never a mix. A token is at least one character
    # of text, so the character cap bounds token-id prompts too.
    n_prompts = len(prompts) if prompts is not None else len(prompt_ids or [])
    base, mask_id = await _check(
        body,
        settings,
        queue,
        tenant,
        texts=prompts if prompts is not None else ["x" * len(ids) for ids in prompt_ids or []],
        max_new_tokens=max_tokens,
        rows=n_prompts * n,
        fields=fields,
    )
    cap = settings.max_inflight_rows_per_tenant
    with _refusals(building=True):
        task = serving.task(
            tenant,
            base,
            mask_id,
            body.sampling(max_tokens),
            prompts=prompts,
            prompt_ids=prompt_ids,
            n=n,
            stream=bool(body.stream),
        )
    head: dict[str, Any] = {"id": f"cmpl-{task.request_id}", "created": int(time.time()), "model": body.model}
    if not body.stream:
        with _refusals():
            done = await serving.generate(task, max_tenant_rows=cap, disconnected=request.is_disconnected)
        choices = [
            CompletionChoice(index=c.index, text=c.text, logprobs=c.logprobs, finish_reason=c.finish_reason)
            for c in done.choices
        ]
        return Completion(**head, choices=choices, usage=Usage.of(done.usage))

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        exclude = None if body.include_usage else {"usage"}
        return Completion(**head, choices=choices, usage=usage).model_dump_json(exclude=exclude)

    async def chunks(events: Events) -> AsyncGenerator[str]:
        sent: dict[int, str] = {}
        async with aclosing(events):
            async for event in events:
                if isinstance(event, GenerateDelta):
                    sent[event.index] = sent.get(event.index, "") + event.text
                    yield chunk([CompletionChoice(index=event.index, text=event.text, finish_reason=None)])
                    continue
                for c in event.choices:
                    rest = unsent(c.text, sent.get(c.index, ""))
                    yield chunk([CompletionChoice(index=c.index, text=rest, finish_reason=c.finish_reason)])
                if body.include_usage:
                    yield chunk([], Usage.of(event.usage))

    with _refusals():
        events = await serving.open_stream(task, max_tenant_rows=cap)
    return _stream(chunks(events))


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={**_STREAM, **error_responses(400, 401, 404, 413, 429, 503, 504)},
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    settings: SettingsDep,
    queue: QueueDep,
    serving: ServingDep,
    tenant: TenantDep,
) -> ChatCompletion | EventStreamResponse:
    """OpenAI's chat completions: n replies to a conversation, rendered with the model's chat template."""
    messages, n = body.chat(), body.n or 1
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens or body.max_tokens or min(settings.max_new_tokens, MAX_NEW_TOKENS)
    fields = GenerationFields(prompt="messages", max_tokens=field)
    texts = [m.content for m in messages]
    base, mask_id = await _check(
        body, settings, queue, tenant, texts=texts, max_new_tokens=max_tokens, rows=n, fields=fields
    )
    cap = settings.max_inflight_rows_per_tenant
    with _refusals(building=True):
        task = serving.task(
            tenant, base, mask_id, body.sampling(max_tokens), messages=messages, n=n, stream=bool(body.stream)
        )
    head: dict[str, Any] = {
        "id": f"chatcmpl-{task.request_id}",
        "created": int(time.time()),
        "model": body.model,
    }
    if not body.stream:
        with _refusals():
            done = await serving.generate(task, max_tenant_rows=cap, disconnected=request.is_disconnected)
        choices = [
            ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
            for c in done.choices
        ]
        return ChatCompletion(**head, choices=choices, usage=Usage.of(done.usage))

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        exclude = None if body.include_usage else {"usage"}
        return ChatCompletionChunk(**head, choices=choices, usage=usage).model_dump_json(exclude=exclude)

    def delta(index: int, **change: Any) -> str:
        return chunk([ChatChunkChoice(index=index, delta=ChatDelta(**change))])

    async def chunks(events: Events) -> AsyncGenerator[str]:
        sent: dict[int, str] = {}  # text streamed per choice; a choice's first chunk names the role
        async with aclosing(events):
            async for event in events:
                if isinstance(event, GenerateDelta):
                    if event.index not in sent:
                        sent[event.index] = ""
                        yield delta(event.index, role="assistant", content="")
                    sent[event.index] += event.text
                    yield delta(event.index, content=event.text)
                    continue
                for c in event.choices:
                    if c.index not in sent:
                        sent[c.index] = ""
                        yield delta(c.index, role="assistant", content="")
                    if rest := unsent(c.text, sent[c.index]):
                        yield delta(c.index, content=rest)
                    yield chunk(
                        [ChatChunkChoice(index=c.index, delta=ChatDelta(), finish_reason=c.finish_reason)]
                    )
                if body.include_usage:
                    yield chunk([], Usage.of(event.usage))

    with _refusals():
        events = await serving.open_stream(task, max_tenant_rows=cap)
    return _stream(chunks(events))


@router.get("/models", response_model=ModelList, responses=error_responses(401, 503))
async def list_models(settings: SettingsDep, queue: QueueDep, tenant: TenantDep) -> ModelList:
    """The base models, and every mask the caller may use as `<model>@<mask_id>`."""
    data = [ModelCard(id=m, created=_STARTED, owned_by="selprune") for m in settings.models]
    for meta in await queue.list_masks(tenant, limit=1000):
        model = meta.get("model")
        if not isinstance(model, str) or not (model in settings.models or settings.allow_any_model):
            continue  # a mask on a model this gateway does not serve
        data.append(ModelCard(id=f"{model}@{meta['mask_id']}", created=_seconds(meta), owned_by=tenant))
    return ModelList(data=data)


def _stream(chunks: AsyncGenerator[str]) -> EventStreamResponse:
    return EventStreamResponse(_data_lines(chunks))


async def _data_lines(chunks: AsyncGenerator[str]) -> AsyncIterator[str]:
    """Each chunk as a bare `data:` event, a failure as a last `{"error": ...}` one, then `[DONE]`.
    Closing it (the client went away) closes `chunks` and so cancels the generation."""
    async with aclosing(chunks):
        try:
            async for data in chunks:
                yield format_event(data)
        except GenerationFailed as exc:
            yield format_event(json.dumps(error_body(exc.info.type, exc.info.message)))
        yield format_event("[DONE]")


def _seconds(meta: dict[str, Any], key: str = "created_at") -> int:
    try:
        return int(float(meta.get(key) or 0))
    except (TypeError, ValueError):
        return 0
