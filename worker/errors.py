"""Errors raised by the worker (the core's own errors live in selprune_core/errors.py).

Hierarchy::

    Exception
    ├── JobError              the job cannot run as asked: it fails, and is not retried (caller's fault)
    │   ├── JobPayloadError   the queued payload does not validate against the protocol package
    │   ├── MaskNotFoundError the mask does not exist or the job's tenant may not see it
    │   ├── JobTimeout        the job ran past its wall-clock limit (SELPRUNE_JOB_TIMEOUT_S)
    │   └── CheckpointMissingError  steps were recorded but the mask after them is gone: no resume
    ├── LeaseLostError        another worker took over the job: stop at once and write nothing more
    └── WorkerFatalError      this worker cannot go on (device lost, CUDA error): it exits and the
                              supervisor restarts it; the job is redelivered to another worker

Names are stable: a failed job stores `to_error_info(exc)`, and the gateway maps the type name to an
HTTP status.

`classify` sorts any exception a job or a serving batch raises into one `Outcome`, so the two lanes
agree on what is the caller's fault, what is the device's, and when the process must exit. Of the
infrastructure errors, `is_outage` picks the ones that say nothing about the job (Redis unreachable or
timing out): an attempt that ends on one is given back rather than counted towards max_attempts.
"""

from __future__ import annotations

import sys
from enum import Enum
from typing import Any

import redis
from pydantic import ValidationError

from selprune_core.errors import CancelledError, SelPruneError

__all__ = [
    "JobError",
    "JobPayloadError",
    "MaskNotFoundError",
    "JobTimeout",
    "CheckpointMissingError",
    "LeaseLostError",
    "WorkerFatalError",
    "to_error_info",
    "is_cuda_oom",
    "is_device_failure",
    "release_cuda_cache",
    "Outcome",
    "classify",
    "is_outage",
]

# Long messages (pydantic errors on big payloads) are cut, so a job hash stays small.
_MAX_MESSAGE_CHARS = 4000


class JobError(Exception):
    """The job cannot run as asked. Fails the job without a retry."""


class JobPayloadError(JobError):
    """The payload stored with the job is not a valid PruneJob/EvaluateJob/ExportJob."""


class MaskNotFoundError(JobError):
    """No mask with this id is visible to the tenant (unknown, deleted, or another tenant's)."""


class JobTimeout(JobError):
    """The job ran past the worker's per-job wall-clock limit; it stops at its next check and fails."""


class CheckpointMissingError(JobError):
    """An earlier attempt recorded steps, but the mask after them (the checkpoint) is gone. Resuming
    would prune on top of an unpruned model and mislabel every later step, so the job fails instead."""


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


class Outcome(Enum):
    """What an exception means for the work that raised it and for the worker."""

    cancelled = "cancelled"  # the caller asked to stop
    fenced = "fenced"  # another worker owns the job now: write nothing
    rejected = "rejected"  # the caller's fault (bad input, unknown mask): fail, do not retry
    infrastructure = "infrastructure"  # Redis, or a fatal error already raised: leave it for a retry
    out_of_memory = "out_of_memory"  # the device is fine: fail this work, free the cache, go on
    device_failure = "device_failure"  # the device is suspect: fail this work, then the worker exits
    internal = "internal"  # a bug: fail this work with its traceback logged


def classify(exc: BaseException) -> Outcome:
    """The `Outcome` of `exc`. An out-of-memory error frees the device cache on the way."""
    if isinstance(exc, LeaseLostError):
        return Outcome.fenced
    if isinstance(exc, CancelledError):
        return Outcome.cancelled
    if isinstance(exc, JobError | SelPruneError | ValidationError):
        return Outcome.rejected
    if isinstance(exc, redis.RedisError | WorkerFatalError):
        return Outcome.infrastructure
    if is_cuda_oom(exc):
        release_cuda_cache()
        return Outcome.out_of_memory
    if is_device_failure(exc):
        return Outcome.device_failure
    return Outcome.internal


def is_outage(exc: BaseException) -> bool:
    """Redis unreachable or timing out: the attempt it ends says nothing about the job, so it is not
    counted. Other Redis errors (a reply error) may be the job's own doing and count like a crash."""
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError)


def _torch_if_loaded() -> Any:
    # A torch exception can only reach us if torch was imported; never import it from here.
    return sys.modules.get("torch")


def is_cuda_oom(exc: BaseException) -> bool:
    """Out of device memory: the work that hit it fails, the device stays usable."""
    torch = _torch_if_loaded()
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def is_device_failure(exc: BaseException) -> bool:
    """A CUDA error other than OOM (illegal access, device assert): the device state is suspect, so the
    process must exit and be restarted."""
    torch = _torch_if_loaded()
    accelerator_error = getattr(torch, "AcceleratorError", None) if torch is not None else None
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)


def release_cuda_cache() -> None:
    torch = _torch_if_loaded()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
