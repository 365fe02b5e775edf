"""POST /v1/evaluate: queue an evaluation of the base model and/or a mask on datasets."""

from __future__ import annotations

from fastapi import APIRouter, Response

from protocol import dump
from service.deps import QueueDep, SettingsDep, TenantDep, mask_id_path, mask_not_found
from service.errors import ApiError, error_responses
from service.job_accept import accept_job, new_job_id
from service.limits import check_budget, check_datasets, check_model
from service.schemas import EvaluateRequest, JobAccepted

router = APIRouter(prefix="/v1", tags=["evaluate"])


@router.post(
    "/evaluate",
    status_code=202,
    response_model=JobAccepted,
    responses={
        200: {
            "model": JobAccepted,
            "description": "the job an earlier request with this idempotency_key made",
        },
        **error_responses(401, 404, 413, 422, 503),
    },
)
async def evaluate(
    body: EvaluateRequest, settings: SettingsDep, queue: QueueDep, tenant: TenantDep, response: Response
) -> JobAccepted:
    """Queue an evaluation job (next-token metrics, optionally toxicity) of the base model and/or a mask."""
    check_model(body.model, settings)
    if body.mask_id is None and not body.include_base:
        raise ApiError(
            422, "ValidationError", "include_base: false with no mask_id leaves nothing to evaluate"
        )
    if body.mask_id is not None:
        mask_id_path(body.mask_id)  # a value not shaped like a mask id is unknown (404), never sent to Redis
        meta = await queue.mask_meta(body.mask_id, tenant)
        if meta is None:
            raise mask_not_found(body.mask_id)
        if meta.get("model") not in (None, body.model):
            raise ApiError(
                422,
                "MaskModelMismatch",
                f"mask {body.mask_id!r} is for model {meta['model']!r}, not {body.model!r}",
            )
    check_datasets([(f"datasets[{i}]", spec) for i, spec in enumerate(body.datasets)], settings)
    check_budget("eval_tokens", body.eval_tokens, settings.max_eval_tokens)
    job = body.to_job(new_job_id(), tenant)
    return await accept_job(queue, settings, response, dump(job), idempotency_key=body.idempotency_key)
