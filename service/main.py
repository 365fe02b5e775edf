"""The gateway app: `create_app(settings)` wires settings, the Redis-backed QueueClient and ServingClient
(sharing one connection pool, opened and closed by the lifespan), the body-size limit, the error
handlers and the routers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.errors import install_error_handlers
from service.limits import BodySizeLimitMiddleware
from service.queue_client import QueueClient
from service.routes import evaluate, generate, health, jobs, masks, openai_compat, unlearn
from service.serving_client import ServingClient
from service.settings import GatewaySettings, get_settings

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
        app.state.queue = QueueClient.from_url(str(settings.redis_url), block_ms=settings.sse_block_ms)
        app.state.serving = ServingClient(
            app.state.queue.redis, timeout_s=settings.generate_timeout_s, block_s=settings.sse_block_ms / 1000
        )
        try:
            yield
        finally:
            await app.state.queue.aclose()

    app = FastAPI(title="selprune", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    for module in (unlearn, jobs, evaluate, masks, generate, openai_compat, health):
        app.include_router(module.router)
    return app
