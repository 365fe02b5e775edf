"""How the serving lane fails at the gateway: `GenerationFailed` (a worker's error event, or nothing in
time) and `GenerationRefused` (one with its own status), and which worker errors are the caller's."""

from __future__ import annotations

from protocol import ErrorInfo

__all__ = ["TIMEOUT_TYPE", "WORKER_REJECTIONS", "GenerationFailed", "GenerationRefused", "failure"]

TIMEOUT_TYPE = "GenerationTimeout"
# Worker error types that are the caller's fault, with their status (service/errors.py's SERVING_STATUS
# maps the others): the model's chat template refused the messages, the tokenizer the prompt, an image
# that does not decode, a fill-mask input without a mask token or too long for the model.
WORKER_REJECTIONS = {"InvalidMessages": 422, "InvalidPrompt": 422, "InvalidImage": 422, "InvalidInput": 422}


class GenerationFailed(Exception):
    """The worker answered with an error, or nothing answered in time; `info` is what the caller sees."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(f"{info.type}: {info.message}")
        self.info = info


class GenerationRefused(GenerationFailed):
    """A failure with its own status: the tenant's in-flight cap (429), a full stream (503), input the
    worker rejected (422), the caller gone (499). The routes answer it with that status and `headers`;
    after a stream's headers it is an error event like any GenerationFailed."""

    def __init__(self, status: int, info: ErrorInfo, retry_after_s: int | None = None) -> None:
        super().__init__(info)
        self.status = status
        self.headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None


def failure(error: ErrorInfo) -> GenerationFailed:
    """A worker's error event as what the routes raise: refused with its own status when it is the
    caller's input the worker rejected."""
    status = WORKER_REJECTIONS.get(error.type)
    return GenerationRefused(status, error) if status is not None else GenerationFailed(error)
