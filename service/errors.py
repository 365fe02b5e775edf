"""The gateway's one error shape, `{"error": {"type", "message"}}`, and the handlers that emit it.

    ApiError                 raised by routes and dependencies; carries status, type name, message
    RequestValidationError   (FastAPI) -> 422 "ValidationError", message names the field(s)
    HTTPException            (Starlette: unknown route, wrong method) -> same status, type from the status
    QUEUE_DOWN_ERRORS        (Redis unreachable) -> 503 "QueueUnavailable"
    GenerationFailed         (serving lane) -> the worker's error type, status from SERVING_STATUS
    any other Exception      -> 500 "InternalError", details only in the log

Only the gateway raises HTTP errors; worker errors arrive as data (`ErrorInfo`), in the job hash or
as a serving reply's `error` event.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol import ErrorInfo
from service.queue_client import QUEUE_DOWN_ERRORS
from service.schemas import ErrorResponse
from service.serving_errors import TIMEOUT_TYPE, GenerationFailed

logger = logging.getLogger(__name__)

# Type names for plain HTTP errors raised by the framework itself.
_STATUS_TYPES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    422: "ValidationError",
    429: "TooManyRequests",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}

# Serving-lane error types -> status; any other worker error is 500. Looked up without an "Error"
# suffix, so a class name (MaskNotFoundError) and a short name (MaskNotFound) agree. A prompt over a cap
# is 400, whether the gateway counts its characters or the worker its tokens (OpenAI answers 400 too).
SERVING_STATUS = {
    TIMEOUT_TYPE: 504,
    "MaskNotFound": 404,
    "MaskMismatch": 422,
    "MaskModelMismatch": 422,
    "PromptTooLong": 400,
    "UnknownModel": 422,
    "ModelLoad": 422,
    "ModelKindMismatch": 422,  # a model of one kind asked to do another's work (generate, classify, fill)
    "InvalidImage": 422,
    "UnsupportedArchitecture": 422,
    "OutOfMemory": 503,  # the batch did not fit on the device this time; a retry may
}


def serving_status(type: str) -> int:
    return SERVING_STATUS.get(type, SERVING_STATUS.get(type.removesuffix("Error"), 500))


class ApiError(Exception):
    """An error the caller should see: HTTP status, a type name and a message."""

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.headers = headers


def error_body(type: str, message: str) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(type=type, message=message)).model_dump()


def error_response(
    status: int, type: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(type, message), status_code=status, headers=headers)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the error shape for these statuses and for 422."""
    return {
        s: {"model": ErrorResponse, "description": _STATUS_TYPES.get(s, "Error")}
        for s in sorted({*statuses, 422})
    }


def _field(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts) or "body"


def validation_message(errors: list[Any], limit: int = 5) -> str:
    msgs = [f"{_field(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in errors[:limit]]
    more = len(errors) - limit
    return "; ".join(msgs) + (f" (and {more} more)" if more > 0 else "")


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError), f"unexpected {type(exc).__name__}"
    return error_response(exc.status, exc.type, exc.message, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError), f"unexpected {type(exc).__name__}"
    return error_response(422, "ValidationError", validation_message(list(exc.errors())))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException), f"unexpected {type(exc).__name__}"
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, _STATUS_TYPES.get(exc.status_code, "HTTPError"), message, headers)


async def _queue_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("queue unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "QueueUnavailable", "the job queue (Redis) is unreachable; retry later")


async def _generation_failed(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GenerationFailed), f"unexpected {type(exc).__name__}"
    return error_response(serving_status(exc.info.type), exc.info.type, exc.info.message)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "InternalError", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(GenerationFailed, _generation_failed)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for exc_type in QUEUE_DOWN_ERRORS:
        app.add_exception_handler(exc_type, _queue_down)
    app.add_exception_handler(Exception, _internal_error)
