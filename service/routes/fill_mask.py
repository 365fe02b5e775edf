"""POST /v1/fill-mask: a masked LM's top tokens at the mask positions of texts, through a mask, on the
serving lane."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import TypeAdapter

from protocol import FillMaskDone, FillMaskEvent, FillMaskTask, GenerateFailed
from service.deps import QueueDep, ServingDep, SettingsDep, TenantDep
from service.errors import error_responses
from service.fill_mask_schemas import FillMaskRequest, FillMaskResponse
from service.limits import check_fill_mask
from service.one_shot import answer_one_shot

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
    task, done = await answer_one_shot(
        FillMaskTask,
        FILL_MASK_EVENT,
        request=request,
        settings=settings,
        serving=serving,
        tenant=tenant,
        model=model,
        mask_id=body.mask_id,
        inputs=body.inputs,
        top_k=body.top_k,
    )
    return FillMaskResponse.from_done(task, done)
