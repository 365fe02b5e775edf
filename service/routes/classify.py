"""POST /v1/classify: image classification through a mask, on the serving lane."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import TypeAdapter

from protocol import ClassifyDone, ClassifyEvent, ClassifyTask, GenerateFailed
from service.deps import QueueDep, ServingDep, SettingsDep, TenantDep
from service.errors import error_responses
from service.image_schemas import ClassifyRequest, ClassifyResponse
from service.limits import check_classification
from service.one_shot import answer_one_shot

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
    task, done = await answer_one_shot(
        ClassifyTask,
        CLASSIFY_EVENT,
        request=request,
        settings=settings,
        serving=serving,
        tenant=tenant,
        model=model,
        mask_id=body.mask_id,
        images=body.images,
        top_k=body.top_k,
    )
    return ClassifyResponse.from_done(task, done)
