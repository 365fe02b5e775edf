"""Masks the caller's jobs produced: list, metadata, safetensors file, export, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from protocol import ExportJob, dump
from service.deps import MaskIdDep, QueueDep, SettingsDep, TenantDep, mask_not_found
from service.errors import error_responses
from service.job_accept import accept_job, new_job_id
from service.schemas import JobAccepted, MaskDeleted, MaskInfo, MaskList, MaskSummary

router = APIRouter(prefix="/v1/masks", tags=["masks"])


@router.get("", response_model=MaskList, responses=error_responses(401, 422, 503))
async def list_masks(
    queue: QueueDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> MaskList:
    """The masks the caller may use, newest first."""
    metas = await queue.list_masks(tenant, limit)
    return MaskList(masks=[MaskSummary.model_validate(m) for m in metas])


@router.get("/{mask_id}", response_model=MaskInfo, responses=error_responses(401, 404, 503))
async def get_mask(mask_id: MaskIdDep, queue: QueueDep, tenant: TenantDep) -> MaskInfo:
    """A mask's metadata: model, parameters, pruned counts, metrics trajectory."""
    meta = await queue.mask_meta(mask_id, tenant)
    if meta is None:
        raise mask_not_found(mask_id)
    return MaskInfo.model_validate(meta)


@router.get(
    "/{mask_id}/file",
    response_class=Response,
    response_model=None,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the mask as safetensors"},
        **error_responses(401, 404, 503),
    },
)
async def get_mask_file(mask_id: MaskIdDep, queue: QueueDep, tenant: TenantDep) -> Response:
    """The mask itself, as a safetensors file."""
    bits = await queue.mask_bits(mask_id, tenant)
    if bits is None:
        raise mask_not_found(mask_id)
    disposition = f'attachment; filename="mask-{mask_id}.safetensors"'
    return Response(bits, media_type="application/octet-stream", headers={"Content-Disposition": disposition})


@router.post(
    "/{mask_id}/export", status_code=202, response_model=JobAccepted, responses=error_responses(401, 404, 503)
)
async def export_mask(
    mask_id: MaskIdDep, queue: QueueDep, settings: SettingsDep, tenant: TenantDep, response: Response
) -> JobAccepted:
    """Queue an export job that folds the mask into a standalone checkpoint."""
    meta = await queue.mask_meta(mask_id, tenant)
    if meta is None:
        raise mask_not_found(mask_id)
    job = ExportJob(job_id=new_job_id(), tenant=tenant, mask_id=mask_id, model=meta.get("model"))
    return await accept_job(queue, settings, response, dump(job))


@router.delete("/{mask_id}", response_model=MaskDeleted, responses=error_responses(401, 404, 503))
async def delete_mask(mask_id: MaskIdDep, queue: QueueDep, tenant: TenantDep) -> MaskDeleted:
    """Forget a mask for the caller; its data goes once no tenant holds it."""
    if not await queue.delete_mask(mask_id, tenant):
        raise mask_not_found(mask_id)
    return MaskDeleted(mask_id=mask_id, deleted=True)
