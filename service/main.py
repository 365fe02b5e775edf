"""The gateway app: `create_app(settings)` wires settings, the Redis-backed QueueClient and ServingClient
(sharing one connection pool, opened and closed by the lifespan), the Host header check, the body-size
limit, the error handlers and the routers.

Every /v1 route also passes `refuse_disallowed_hub_datasets`: a request body naming a hub dataset that
SELPRUNE_HUB_DATASETS does not allow is answered 422 before the route runs, so nothing is queued. It
reads the parsed JSON body, so it covers every route that takes dataset references.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from pydantic import ValidationError

from protocol import HubData
from protocol.hub_policy import hub_dataset_refusal, is_hub_id
from service.auth import HostCheckMiddleware, allowed_hosts
from service.deps import SettingsDep, TenantDep
from service.errors import ApiError, install_error_handlers
from service.limits import BodySizeLimitMiddleware
from service.queue_client import QueueClient
from service.routes import (
    classify,
    evaluate,
    fill_mask,
    generate,
    health,
    jobs,
    masks,
    openai_compat,
    unlearn,
)
from service.serving_client import ServingClient
from service.settings import GatewaySettings, get_settings
from service.stream_slots import StreamSlots

logger = logging.getLogger(__name__)

DESCRIPTION = """Unlearning as a service. `POST /v1/unlearn` queues a selective-pruning job and answers 202
with a job id; follow it with `GET /v1/jobs/{id}` or its server-sent events; the result is a neuron mask
(`/v1/masks`). `POST /v1/generate` (and the OpenAI-compatible `/v1/completions`, `/v1/chat/completions`,
`/v1/models`) generate through a mask. Every error is `{"error": {"type", "message"}}`."""


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway; `settings` defaults to the environment's (`get_settings()`)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.auth_enabled:
            logger.warning("SELPRUNE_API_KEYS is not set: authentication is off (serve on loopback only)")
        app.state.queue = QueueClient.from_url(
            str(settings.redis_url),
            block_ms=settings.sse_block_ms,
            max_connections=settings.redis_max_connections,
        )
        app.state.serving = ServingClient(
            app.state.queue.redis, timeout_s=settings.generate_timeout_s, block_s=settings.sse_block_ms / 1000
        )
        try:
            yield
        finally:
            await app.state.queue.aclose()

    app = FastAPI(title="selprune", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.stream_slots = StreamSlots(settings.max_event_streams_per_tenant, settings.event_stream_max_s)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    hosts = allowed_hosts(settings)
    if hosts is not None:  # added last, so it runs first: a foreign Host gets nothing else
        app.add_middleware(HostCheckMiddleware, allowed=hosts)
    guarded = [Depends(refuse_disallowed_hub_datasets)]
    for module in (unlearn, jobs, evaluate, masks, generate, classify, fill_mask, openai_compat):
        app.include_router(module.router, dependencies=guarded)
    app.include_router(health.router)
    return app


async def refuse_disallowed_hub_datasets(request: Request, settings: SettingsDep, _tenant: TenantDep) -> None:
    """422 HubDatasetNotAllowed for a hub dataset reference the deployment's policy refuses.

    Runs after authentication (so the allowlist is told only to callers) and skips references that
    are malformed (not a valid HubData, an id not shaped like a hub id): the route's checks name those.
    """
    if request.method not in ("POST", "PUT", "PATCH") or not await request.body():
        return
    try:
        body = await request.json()
    except ValueError:  # the route answers a body that is not JSON
        return
    for field, ref in _hub_references(body):
        try:
            dataset_id = HubData.model_validate(ref).id
        except ValidationError:
            continue
        if is_hub_id(dataset_id) and (reason := hub_dataset_refusal(settings.hub_datasets, dataset_id)):
            raise ApiError(422, "HubDatasetNotAllowed", f"{field}: {reason}")


def _hub_references(body: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(field path, object) of every `{"kind": "hub", ...}` object in a JSON value, depth first."""
    stack: list[tuple[str, Any]] = [("body", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            if value.get("kind") == "hub":
                yield where, value
            stack += [(k if where == "body" else f"{where}.{k}", v) for k, v in reversed(value.items())]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value)))]
