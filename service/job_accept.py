"""Accepting a job: every route that queues work (unlearn, evaluate, mask export) answers through here."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Response

from protocol import JobProgress, JobState
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
