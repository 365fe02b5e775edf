"""Jobs: status, list, server-sent events, cancel; and `accept_job`, which every enqueuing route uses."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse

from protocol import JobProgress, JobState
from service.deps import JobIdDep, QueueDep, SettingsDep, TenantDep, job_not_found
from service.errors import ApiError, error_responses
from service.queue_client import QueueClient, is_finished
from service.schemas import JobAccepted, JobList, JobStatusResponse, JobSummary
from service.settings import GatewaySettings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_STREAM_ID = re.compile(r"\d{1,20}(-\d{1,20})?")
_EVENT_NAME = re.compile(r"[^A-Za-z0-9_-]")


def new_job_id() -> str:
    return uuid.uuid4().hex


async def accept_job(
    queue: QueueClient,
    settings: GatewaySettings,
    response: Response,
    payload: dict[str, Any],
    *,
    steps: int = 0,
    idempotency_key: str | None = None,
) -> JobAccepted:
    """Queue a validated payload; 202 for a new job, 200 for the job an idempotency key made earlier."""
    job_id, created = await queue.enqueue(
        payload,
        progress=JobProgress(phase="queued", steps=steps).model_dump(mode="json"),
        idempotency_key=idempotency_key,
        idempotency_ttl_s=settings.idempotency_ttl_s,
    )
    kind, state = str(payload["job_kind"]), JobState.queued
    if not created:
        response.status_code = 200
        record = await queue.get_job(job_id, str(payload["tenant"]), with_steps=False)
        if record is not None:
            summary = JobSummary.from_fields(job_id, record.fields)
            kind, state = summary.kind, summary.state
    return JobAccepted(
        job_id=job_id,
        kind=kind,
        state=state,
        created=created,
        status_url=f"/v1/jobs/{job_id}",
        events_url=f"/v1/jobs/{job_id}/events",
    )


@router.get("", response_model=JobList, responses=error_responses(401, 422, 503))
async def list_jobs(
    queue: QueueDep,
    tenant: TenantDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobList:
    """The caller's jobs, newest first."""
    records = await queue.list_jobs(tenant, state, limit)
    return JobList(jobs=[JobSummary.from_fields(r.job_id, r.fields) for r in records])


@router.get("/{job_id}", response_model=JobStatusResponse, responses=error_responses(401, 404, 503))
async def get_job(job_id: JobIdDep, queue: QueueDep, tenant: TenantDep) -> JobStatusResponse:
    """A job's state, progress, per-step metrics, and its result or error."""
    record = await queue.get_job(job_id, tenant)
    if record is None:
        raise job_not_found(job_id)
    return JobStatusResponse.from_job(job_id, record.fields, record.steps)


@router.get(
    "/{job_id}/plot",
    response_class=Response,
    response_model=None,
    responses={
        200: {"content": {"image/png": {}}, "description": "forget drop vs retain drop, one point per step"},
        **error_responses(401, 404, 503),
    },
)
async def job_plot(job_id: JobIdDep, queue: QueueDep, tenant: TenantDep) -> Response:
    """A prune job's trade-off plot (PNG): relative top-1 drop of the forget set against the retain
    set's, one point per completed step with 95% intervals. Re-rendered after every step."""
    plot = await queue.job_plot(job_id, tenant)
    if plot is None:
        raise job_not_found(job_id)
    if plot.png is None:
        what = "no completed step yet" if plot.kind == "prune" else f"it is a {plot.kind or 'non-prune'} job"
        raise ApiError(
            404,
            "PlotNotReady",
            f"job {job_id!r} has no plot: {what}. Prune jobs get one after their first completed step "
            "(step 0, the unpruned evaluation).",
        )
    return Response(content=plot.png, media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.delete("/{job_id}", response_model=JobStatusResponse, responses=error_responses(401, 404, 409, 503))
async def cancel_job(job_id: JobIdDep, queue: QueueDep, tenant: TenantDep) -> JobStatusResponse:
    """Cancel a job: a queued one at once, a running one at its next check; 409 once finished."""
    outcome = await queue.cancel(job_id, tenant)
    if outcome is None:
        raise job_not_found(job_id)
    before, _ = outcome
    if is_finished(before):
        raise ApiError(409, "JobFinished", f"job {job_id!r} already {before}; nothing to cancel")
    record = await queue.get_job(job_id, tenant)
    if record is None:
        raise job_not_found(job_id)
    return JobStatusResponse.from_job(job_id, record.fields, record.steps)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    response_model=None,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "progress, step and state events"},
        **error_responses(401, 404, 422, 503),
    },
)
async def job_events(
    job_id: JobIdDep,
    queue: QueueDep,
    tenant: TenantDep,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Server-sent events of a job (progress, step, state), ending with a state event once it finishes."""
    if last_event_id is not None and not _STREAM_ID.fullmatch(last_event_id):
        raise ApiError(422, "ValidationError", "Last-Event-ID: expected a stream id like '1700000000000-0'")
    if await queue.get_job(job_id, tenant, with_steps=False) is None:
        raise job_not_found(job_id)
    stream = _events(queue, job_id, last_event_id or "0-0", settings.sse_block_ms)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


def _sse(event: str, data: str, id: str | None = None) -> str:
    lines = [f"id: {id}"] if id else []
    lines.append(f"event: {_EVENT_NAME.sub('', event) or 'progress'}")
    lines += [f"data: {line}" for line in data.splitlines() or [""]]
    return "\n".join(lines) + "\n\n"


def _is_terminal(event: str, data: str) -> bool:
    if event != "state":
        return False
    try:
        obj = json.loads(data)
    except ValueError:
        return False
    return isinstance(obj, dict) and is_finished(obj.get("state"))


async def _events(queue: QueueClient, job_id: str, after: str, block_ms: int) -> AsyncIterator[str]:
    """Follow the job's events stream; stop after a terminal state event, or once the hash says finished."""
    while True:
        events = await queue.read_events(job_id, after, block_ms=None)
        if not events:
            fields = await queue.job_fields(job_id)
            if not fields:
                yield _sse("error", json.dumps({"type": "JobNotFound", "message": f"job {job_id!r} is gone"}))
                return
            if is_finished(fields.get("state")):
                yield _sse("state", JobSummary.from_fields(job_id, fields).model_dump_json())
                return
            events = await queue.read_events(job_id, after, block_ms=block_ms)
            if not events:
                yield ": keep-alive\n\n"
                continue
        for ev in events:
            yield _sse(ev.event, ev.data, ev.id)
            after = ev.id
            if _is_terminal(ev.event, ev.data):
                return
