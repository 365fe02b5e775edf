"""POST /v1/fill-mask: a masked LM's top tokens at the mask positions of texts, through a mask, on the
serving lane."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from pydantic import TypeAdapter, ValidationError

from protocol import FillMaskDone, FillMaskEvent, FillMaskTask, GenerateFailed
from service.deps import QueueDep, ServingDep, SettingsDep, TenantDep
from service.errors import ApiError, error_responses, validation_message
from service.fill_mask_schemas import FillMaskRequest, FillMaskResponse
from service.limits import check_fill_mask
from service.serving_client import new_request_id
from service.serving_errors import GenerationRefused

router = APIRouter(prefix="/v1", tags=["fill-mask"])
FILL_MASK_EVENT: TypeAdapter[FillMaskDone | GenerateFailed] = TypeAdapter(FillMaskEvent)


@router.post(
    "/fill-mask",
    response_model=FillMaskResponse,
    responses=error_responses(401, 404, 413, 422, 429, 503, 504),
)
async def fill_mask(
    body: FillMaskRequest,
    request: Request,
    settings: SettingsDep,
    queue: QueueDep,
    serving: ServingDep,
    tenant: TenantDep,
) -> FillMaskResponse:
    """Fill the mask tokens of texts (top-k tokens per position and the filled text), through a mask when
    `mask_id` is set."""
    model = await check_fill_mask(
        queue, settings, tenant, model=body.model, mask_id=body.mask_id, inputs=body.inputs
    )
    now = time.time()
    try:
        task = FillMaskTask(
            request_id=new_request_id(),
            tenant=tenant,
            model=model,
            mask_id=body.mask_id,
            inputs=body.inputs,
            top_k=body.top_k,
            enqueued_at=now,
            deadline=now + serving.timeout_s,
        )
    except ValidationError as exc:  # the request passed its own model, so this is a contract bound
        raise ApiError(422, "ValidationError", validation_message(list(exc.errors()))) from None
    cap = settings.max_inflight_rows_per_tenant
    try:
        done = await serving.one_shot(
            task, FILL_MASK_EVENT, max_tenant_rows=cap, disconnected=request.is_disconnected
        )
    except GenerationRefused as exc:  # the tenant's cap, a full lane, an input the worker cannot fill
        raise ApiError(exc.status, exc.info.type, exc.info.message, exc.headers) from None
    return FillMaskResponse.from_done(task, done)
