"""Errors raised by the worker (the core's own errors live in selprune_core/errors.py).

Hierarchy::

    Exception
    ├── JobError              the job cannot run as asked: it fails, and is not retried (caller's fault)
    │   ├── JobPayloadError   the queued payload does not validate against worker/payloads.py
    │   └── MaskNotFoundError the mask does not exist or the job's tenant may not see it
    ├── LeaseLostError        another worker took over the job: stop at once and write nothing more
    └── WorkerFatalError      this worker cannot go on (device lost, CUDA error): it exits and the
                              supervisor restarts it; the job is redelivered to another worker

Names are stable: a failed job stores `to_error_info(exc)`, and the gateway maps the type name to an
HTTP status.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "JobError",
    "JobPayloadError",
    "MaskNotFoundError",
    "LeaseLostError",
    "WorkerFatalError",
    "to_error_info",
]

# Long messages (pydantic errors on big payloads) are cut, so a job hash stays small.
_MAX_MESSAGE_CHARS = 4000


class JobError(Exception):
    """The job cannot run as asked. Fails the job without a retry."""


class JobPayloadError(JobError):
    """The payload stored with the job is not a valid PruneJob/EvaluateJob/ExportJob."""


class MaskNotFoundError(JobError):
    """No mask with this id is visible to the tenant (unknown, deleted, or another tenant's)."""


class LeaseLostError(Exception):
    """The job's lease now names another worker (this one stalled past the lease TTL).

    The new holder owns the job; the fenced-off worker must not write steps, state or results.
    """


class WorkerFatalError(Exception):
    """The worker process must exit; a supervisor restarts it with a fresh device."""


def to_error_info(exc: BaseException) -> dict[str, Any]:
    """The error as data: {"type": class name, "message": text}, the shape of payloads.ErrorInfo."""
    message = str(exc)
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + " [truncated]"
    return {"type": type(exc).__name__, "message": message}
