"""POST /v1/unlearn: validate an unlearning request and queue it as a PruneJob."""

from __future__ import annotations

from fastapi import APIRouter, Response

from protocol import dump
from service.deps import QueueDep, SettingsDep, TenantDep
from service.errors import error_responses
from service.job_accept import accept_job, new_job_id
from service.limits import check_datasets, check_model, check_prune_params
from service.schemas import JobAccepted, UnlearnRequest

router = APIRouter(prefix="/v1", tags=["unlearn"])


@router.post(
    "/unlearn",
    status_code=202,
    response_model=JobAccepted,
    responses={
        200: {
            "model": JobAccepted,
            "description": "the job an earlier request with this idempotency_key made",
        },
        **error_responses(401, 413, 422, 503),
    },
)
async def unlearn(
    body: UnlearnRequest, settings: SettingsDep, queue: QueueDep, tenant: TenantDep, response: Response
) -> JobAccepted:
    """Queue an unlearning job: prune neurons that matter for `forget` more than for `retain`."""
    check_model(body.model, settings)
    named = [("forget", body.forget), ("retain", body.retain)]
    named += [(f"eval[{i}]", spec) for i, spec in enumerate(body.eval or [])]
    check_datasets(named, settings)
    check_prune_params(body.params, settings)
    job = body.to_job(new_job_id(), tenant)
    return await accept_job(
        queue, settings, response, dump(job), steps=body.params.steps, idempotency_key=body.idempotency_key
    )
