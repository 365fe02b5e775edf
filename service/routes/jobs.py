"""Jobs: status, list, plot, server-sent events, cancel. Queuing one is `service.job_accept`."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse

from protocol import JobState
from service.deps import JobIdDep, QueueDep, SettingsDep, StreamSlotsDep, TenantDep, job_not_found
from service.errors import ApiError, error_responses
from service.queue_client import QueueClient
from service.schemas import JobList, JobStatusResponse, JobSummary
from service.sse import KEEP_ALIVE, EventStreamResponse, format_event

_FINISHED = {s.value for s in JobState if s.finished}

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_STREAM_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")
_STREAM_ID_PART_LIMIT = 2**64  # each part of a stream id is an unsigned 64-bit integer in Redis
_EVENT_NAME = re.compile(r"[^A-Za-z0-9_-]")


@router.get("", response_model=JobList, responses=error_responses(401, 422, 503))
async def list_jobs(
    queue: QueueDep,
    tenant: TenantDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobList:
    """The caller's jobs, newest first."""
    records = await queue.list_jobs(tenant, state, limit)
    return JobList(jobs=[JobSummary.from_job_hash(r.job_id, r.job) for r in records])


@router.get("/{job_id}", response_model=JobStatusResponse, responses=error_responses(401, 404, 503))
async def get_job(job_id: JobIdDep, queue: QueueDep, tenant: TenantDep) -> JobStatusResponse:
    """A job's state, progress, per-step metrics, and its result or error."""
    record = await queue.get_job(job_id, tenant)
    if record is None:
        raise job_not_found(job_id)
    return JobStatusResponse.from_job(job_id, record.job, record.steps)


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
    if before.finished:
        raise ApiError(409, "JobFinished", f"job {job_id!r} already {before}; nothing to cancel")
    record = await queue.get_job(job_id, tenant)
    if record is None:
        raise job_not_found(job_id)
    return JobStatusResponse.from_job(job_id, record.job, record.steps)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    response_model=None,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "progress, step and state events"},
        **error_responses(401, 404, 422, 429, 503),
    },
)
async def job_events(
    job_id: JobIdDep,
    queue: QueueDep,
    tenant: TenantDep,
    settings: SettingsDep,
    slots: StreamSlotsDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventStreamResponse:
    """Server-sent events of a job (progress, step, state), ending with a state event once it finishes."""
    if last_event_id is not None and not _is_stream_id(last_event_id):
        raise ApiError(
            422,
            "ValidationError",
            "Last-Event-ID: expected a stream id like '1700000000000-0' (milliseconds and sequence each "
            "below 2**64)",
        )
    if await queue.get_job(job_id, tenant, with_steps=False) is None:
        raise job_not_found(job_id)
    slots.take(tenant)
    events = _events(queue, job_id, last_event_id or "0-0", settings.sse_block_ms)
    return EventStreamResponse(slots.hold(tenant, events))


def _is_stream_id(value: str) -> bool:
    """`ms` or `ms-seq` as Redis reads a stream id: both parts unsigned 64-bit integers."""
    if not _STREAM_ID.fullmatch(value):
        return False
    return all(int(part) < _STREAM_ID_PART_LIMIT for part in value.split("-"))


def _job_event(event: str, data: str, id: str | None = None) -> str:
    """A job event framed; a name the worker mangled is cleaned, and an empty one is `progress`."""
    return format_event(data, event=_EVENT_NAME.sub("", event) or "progress", id=id or None)


def _is_terminal(event: str, data: str) -> bool:
    if event != "state":
        return False
    try:
        obj = json.loads(data)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("state") in _FINISHED


async def _events(queue: QueueClient, job_id: str, after: str, block_ms: int) -> AsyncIterator[str]:
    """Follow the job's events stream; stop after a terminal state event, or once the hash says finished."""
    while True:
        events = await queue.read_events(job_id, after, block_ms=None)
        if not events:
            job = await queue.job_hash(job_id)
            if job is None:
                yield _job_event(
                    "error", json.dumps({"type": "JobNotFound", "message": f"job {job_id!r} is gone"})
                )
                return
            if job.state.finished:
                yield _job_event("state", JobSummary.from_job_hash(job_id, job).model_dump_json())
                return
            events = await queue.read_events(job_id, after, block_ms=block_ms)
            if not events:
                yield KEEP_ALIVE
                continue
        for ev in events:
            yield _job_event(ev.event, ev.data, ev.id)
            after = ev.id
            if _is_terminal(ev.event, ev.data):
                return
