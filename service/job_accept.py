"""Accepting a job: every route that queues work (unlearn, evaluate, mask export) answers through here."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Response

from protocol import JobProgress, JobState
from protocol.scripts import Enqueued
from service.errors import ApiError
from service.queue_client import QueueClient
from service.schemas import JobAccepted, JobSummary
from service.settings import GatewaySettings


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
    """Queue a validated payload; 202 for a new job, 200 for the job an idempotency key made earlier.

    409 when the key was used for another request; 429 when the tenant holds its cap of unfinished jobs.
    """
    job_id, outcome = await queue.enqueue(
        payload,
        progress=JobProgress(phase="queued", steps=steps).model_dump(mode="json"),
        idempotency_key=idempotency_key,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        max_active_jobs=settings.max_active_jobs_per_tenant,
        history_s=settings.job_history_s,
    )
    if outcome is Enqueued.over_quota:
        raise ApiError(
            429,
            "TooManyJobs",
            f"this key already has {settings.max_active_jobs_per_tenant} unfinished jobs; "
            "wait for some to finish or cancel them",
            headers={"Retry-After": str(settings.jobs_retry_after_s)},
        )
    if outcome is Enqueued.key_reused:
        raise ApiError(
            409,
            "IdempotencyKeyReused",
            f"idempotency key {idempotency_key!r} was used for another request (job {job_id}); "
            "use a new key for a different request",
        )
    created = outcome is Enqueued.created
    kind, state = str(payload["job_kind"]), JobState.queued
    if not created:
        response.status_code = 200
        record = await queue.get_job(job_id, str(payload["tenant"]), with_steps=False)
        if record is not None:
            summary = JobSummary.from_job_hash(job_id, record.job)
            kind, state = summary.kind, summary.state
    return JobAccepted(
        job_id=job_id,
        kind=kind,
        state=state,
        created=created,
        status_url=f"/v1/jobs/{job_id}",
        events_url=f"/v1/jobs/{job_id}/events",
    )
