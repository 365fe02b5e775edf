"""Probes and metrics, outside /v1 and without API keys: /healthz, /readyz, /metrics (which takes its
own Bearer token when SELPRUNE_METRICS_KEY is set)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import check_metrics_key
from service.deps import QueueDep, ServingDep, SettingsDep
from service.errors import error_response, error_responses
from service.metrics import render_metrics
from service.queue_client import QUEUE_DOWN_ERRORS
from service.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])

metrics_bearer = HTTPBearer(auto_error=False, scheme_name="MetricsKey", description="SELPRUNE_METRICS_KEY")


def metrics_access(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(metrics_bearer)],
) -> None:
    check_metrics_key(settings, credentials)


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """200 while the process is up."""
    return HealthResponse()


@router.get("/readyz", response_model=ReadyResponse, responses=error_responses(503))
async def readyz(queue: QueueDep, serving: ServingDep) -> ReadyResponse | JSONResponse:
    """200 when Redis answers and at least one worker (job or serving role) has a live heartbeat;
    else 503 saying which."""
    try:
        await queue.ping()
    except QUEUE_DOWN_ERRORS:
        return error_response(503, "NotReady", "Redis does not answer PING")
    workers = await queue.worker_count()
    servers = len(await serving.servers())
    if workers == 0 and servers == 0:
        return error_response(503, "NotReady", "no worker heartbeat: start a worker (`selprune worker`)")
    return ReadyResponse(redis=True, workers=workers, servers=servers)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    response_model=None,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"},
        401: {"description": "Unauthorized: SELPRUNE_METRICS_KEY is set and the request lacks it"},
    },
    dependencies=[Depends(metrics_access)],
)
async def metrics(queue: QueueDep, serving: ServingDep, settings: SettingsDep) -> PlainTextResponse:
    """Queue depth, jobs by state, workers, job and step durations, serving queue, servers and batch
    time and size (Prometheus text format). With SELPRUNE_METRICS_KEY set, send it as a Bearer token."""
    text = await render_metrics(queue, serving, settings)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")
