"""POST /v1/classify: image classification through a mask, on the serving lane."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from pydantic import TypeAdapter, ValidationError

from protocol import ClassifyDone, ClassifyEvent, ClassifyTask, GenerateFailed
from service.deps import QueueDep, ServingDep, SettingsDep, TenantDep
from service.errors import ApiError, error_responses, validation_message
from service.image_schemas import ClassifyRequest, ClassifyResponse
from service.limits import check_classification
from service.serving_client import new_request_id
from service.serving_errors import GenerationRefused

router = APIRouter(prefix="/v1", tags=["classify"])
CLASSIFY_EVENT: TypeAdapter[ClassifyDone | GenerateFailed] = TypeAdapter(ClassifyEvent)


@router.post(
    "/classify", response_model=ClassifyResponse, responses=error_responses(401, 404, 413, 422, 429, 503, 504)
)
async def classify(
    body: ClassifyRequest,
    request: Request,
    settings: SettingsDep,
    queue: QueueDep,
    serving: ServingDep,
    tenant: TenantDep,
) -> ClassifyResponse:
    """Classify images (top-k classes and probabilities each), through a mask when `mask_id` is set."""
    model = await check_classification(
        queue, settings, tenant, model=body.model, mask_id=body.mask_id, images=body.images
    )
    now = time.time()
    try:
        task = ClassifyTask(
            request_id=new_request_id(),
            tenant=tenant,
            model=model,
            mask_id=body.mask_id,
            images=body.images,
            top_k=body.top_k,
            enqueued_at=now,
            deadline=now + serving.timeout_s,
        )
    except ValidationError as exc:  # the request passed its own model, so this is a contract bound
        raise ApiError(422, "ValidationError", validation_message(list(exc.errors()))) from None
    cap = settings.max_inflight_rows_per_tenant
    try:
        done = await serving.one_shot(
            task, CLASSIFY_EVENT, max_tenant_rows=cap, disconnected=request.is_disconnected
        )
    except GenerationRefused as exc:  # the tenant's cap, a full lane, an image the worker cannot read
        raise ApiError(exc.status, exc.info.type, exc.info.message, exc.headers) from None
    return ClassifyResponse.from_done(task, done)
