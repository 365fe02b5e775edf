"""The gateway half of a one-forward request (classify, fill-mask): build the task, queue it on the
serving lane, wait for its one reply, and turn a refusal into the one error shape."""

from __future__ import annotations

import time
from typing import Any, TypeVar

from fastapi import Request
from pydantic import TypeAdapter, ValidationError

from protocol import ClassifyTask, FillMaskTask, GenerateFailed
from service.errors import ApiError, validation_message
from service.serving_client import ServingClient, new_request_id
from service.serving_errors import GenerationRefused
from service.settings import GatewaySettings

TaskT = TypeVar("TaskT", ClassifyTask, FillMaskTask)
DoneT = TypeVar("DoneT")


async def answer_one_shot(
    task_type: type[TaskT],
    events: TypeAdapter[DoneT | GenerateFailed],
    *,
    request: Request,
    settings: GatewaySettings,
    serving: ServingClient,
    tenant: str,
    model: str,
    **fields: Any,  # the request's own fields of the task: mask_id, images or inputs, top_k
) -> tuple[TaskT, DoneT]:
    """The queued task and its reply; ApiError for a task the contract refuses or a refused request."""
    now = time.time()
    try:
        task = task_type(
            request_id=new_request_id(),
            tenant=tenant,
            model=model,
            enqueued_at=now,
            deadline=now + serving.timeout_s,
            **fields,
        )
    except ValidationError as exc:  # the request passed its own model, so this is a contract bound
        raise ApiError(422, "ValidationError", validation_message(list(exc.errors()))) from None
    try:
        done = await serving.one_shot(
            task,
            events,
            max_tenant_rows=settings.max_inflight_rows_per_tenant,
            disconnected=request.is_disconnected,
        )
    except GenerationRefused as exc:  # the tenant's cap, a full lane, an input the worker cannot read
        raise ApiError(exc.status, exc.info.type, exc.info.message, exc.headers) from None
    return task, done
