"""Dependencies, as Annotated aliases: `SettingsDep`, `QueueDep`, `ServingDep`, `TenantDep`, `JobIdDep`,
`MaskIdDep`.

Settings, the QueueClient and the ServingClient live on `app.state` (set by `create_app` and its
lifespan), so each app instance, including a test's, carries its own; tests may still use
`app.dependency_overrides`.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials

from service.auth import authenticate, bearer_scheme
from service.errors import ApiError
from service.queue_client import QueueClient
from service.serving_client import ServingClient
from service.settings import GatewaySettings
from service.stream_slots import StreamSlots


def get_app_settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


def get_queue_client(request: Request) -> QueueClient:
    queue: QueueClient = request.app.state.queue
    return queue


def get_serving_client(request: Request) -> ServingClient:
    serving: ServingClient = request.app.state.serving
    return serving


def get_stream_slots(request: Request) -> StreamSlots:
    slots: StreamSlots = request.app.state.stream_slots
    return slots


SettingsDep = Annotated[GatewaySettings, Depends(get_app_settings)]
QueueDep = Annotated[QueueClient, Depends(get_queue_client)]
ServingDep = Annotated[ServingClient, Depends(get_serving_client)]
StreamSlotsDep = Annotated[StreamSlots, Depends(get_stream_slots)]


def get_tenant(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> str:
    return authenticate(settings, credentials)


TenantDep = Annotated[str, Depends(get_tenant)]


# Ids in paths: anything not shaped like an id is answered like an unknown id (404).
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def job_not_found(job_id: str) -> ApiError:
    return ApiError(404, "JobNotFound", f"job {job_id[:128]!r} not found")


def mask_not_found(mask_id: str) -> ApiError:
    return ApiError(404, "MaskNotFound", f"mask {mask_id[:128]!r} not found")


def job_id_path(
    job_id: Annotated[str, Path(description="a job id from POST /v1/unlearn or /v1/evaluate")],
) -> str:
    if not _ID.fullmatch(job_id):
        raise job_not_found(job_id)
    return job_id


def mask_id_path(mask_id: Annotated[str, Path(description="a mask id from a finished job")]) -> str:
    if not _ID.fullmatch(mask_id):
        raise mask_not_found(mask_id)
    return mask_id


JobIdDep = Annotated[str, Depends(job_id_path)]
MaskIdDep = Annotated[str, Depends(mask_id_path)]
