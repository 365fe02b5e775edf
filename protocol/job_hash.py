"""The typed layout of a job's Redis records: its hash (`keys.JOB_KEY`) and its events stream.

Every value in the hash is a string: JSON for the structured parts, `repr` of unix seconds for times,
decimal for counts and "1" for the cancel flag. `JobHash` is the one place that knows this. Writers
encode (`JobHash.encode` for a new job, `job_fields` for an update of some fields); readers decode
(`JobHash.decode`), leniently: a field that does not parse is logged and read as unset, so one bad
value never hides a job.

Events are stream entries {"event": progress | step | state, "data": JSON}; `event_fields` and
`state_event` build them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from protocol.base import ErrorInfo
from protocol.jobs import JobProgress, JobState

__all__ = ["JobHash", "decode_text", "event_fields", "job_fields", "state_event"]

log = logging.getLogger(__name__)


class JobHash(BaseModel):
    """One job as its hash holds it."""

    state: JobState = JobState.running  # an unknown state reads as running: the job is not finished
    kind: str = "unknown"  # the payload's job_kind: prune | evaluate | export
    tenant: str = ""
    payload: dict[str, Any] = Field(default_factory=dict)  # the job model's wire form, incl. job_id
    created_at: float | None = None  # unix seconds
    started_at: float | None = None  # of the latest attempt
    finished_at: float | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    attempts: int = 0  # starts so far; past the worker's max_attempts the job is dead-lettered
    worker: str | None = None  # consumer name of the worker that started the latest attempt
    result: dict[str, Any] | None = None  # what the job returned, on succeeded
    error: ErrorInfo | None = None  # on failed
    cancel_requested: bool = False

    @classmethod
    def decode(cls, raw: Mapping[Any, Any]) -> JobHash | None:
        """The job in a raw HGETALL reply (bytes or str), or None for an empty one (no such job)."""
        fields = {decode_text(k): decode_text(v) for k, v in raw.items()}
        if not fields:
            return None
        values: dict[str, Any] = {}
        for name, text in fields.items():
            decoder = _DECODERS.get(name)
            if decoder is None:
                continue  # a field a newer writer added
            try:
                values[name] = decoder(text)
            except (ValueError, ValidationError):
                log.warning("job field %s does not parse: %.80s", name, text)
        if values.get("kind") in (None, "") and isinstance(values.get("payload"), dict):
            values["kind"] = values["payload"].get("job_kind", "unknown")
        return cls.model_validate(values)

    @classmethod
    def read(cls, raw: Mapping[Any, Any]) -> JobHash:
        """Some fields of a job (an HMGET reply zipped with its field names); the rest take defaults."""
        return cls.decode({k: v for k, v in raw.items() if v is not None}) or cls()

    def encode(self) -> dict[str, str]:
        """Every set field, as the hash stores it."""
        return job_fields(**{name: getattr(self, name) for name in type(self).model_fields})

    @property
    def mask_id(self) -> str | None:
        """The mask a finished prune job produced."""
        mask_id = (self.result or {}).get("mask_id")
        return mask_id if isinstance(mask_id, str) else None


def job_fields(**values: Any) -> dict[str, str]:
    """Some fields of a job hash, encoded for HSET; None values and a False cancel flag are left out."""
    out: dict[str, str] = {}
    for name, value in values.items():
        if name not in _ENCODERS:
            raise ValueError(f"a job hash has no field {name!r}")
        if value is None or (name == "cancel_requested" and not value):
            continue
        out[name] = _ENCODERS[name](value)
    return out


def decode_text(value: Any) -> str:
    """A Redis reply value as text (clients may return bytes or str)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def state_event(job_id: str, state: JobState, error: ErrorInfo | dict[str, Any] | None = None) -> str:
    """The data (JSON) of a `state` event."""
    data: dict[str, Any] = {"type": "state", "job_id": job_id, "state": JobState(state).value}
    if error is not None:
        data["error"] = error.model_dump() if isinstance(error, ErrorInfo) else error
    return json.dumps(data)


def event_fields(event: str, data: Mapping[str, Any] | str) -> dict[str, str]:
    """One entry of a job's events stream."""
    return {"event": event, "data": data if isinstance(data, str) else json.dumps(data)}


def _json_object(text: str) -> dict[str, Any] | None:
    value = json.loads(text) if text else None
    if value is not None and not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _error(text: str) -> ErrorInfo | None:
    value = _json_object(text)
    return None if value is None else ErrorInfo.model_validate(value)


def _time(text: str) -> float | None:
    return float(text) if text else None


def _json_dump(value: Any) -> str:
    return value.model_dump_json() if isinstance(value, BaseModel) else json.dumps(value)


_DECODERS: dict[str, Callable[[str], Any]] = {
    "state": JobState,
    "kind": str,
    "tenant": str,
    "payload": lambda text: _json_object(text) or {},
    "created_at": _time,
    "started_at": _time,
    "finished_at": _time,
    "progress": lambda text: JobProgress.model_validate(_json_object(text) or {}),
    "attempts": lambda text: int(text or 0),
    "worker": str,
    "result": _json_object,
    "error": _error,
    "cancel_requested": lambda text: text == "1",
}
_ENCODERS: dict[str, Callable[[Any], str]] = {
    "state": lambda state: JobState(state).value,
    "kind": str,
    "tenant": str,
    "payload": _json_dump,
    "created_at": repr,
    "started_at": repr,
    "finished_at": repr,
    "progress": _json_dump,
    "attempts": str,
    "worker": str,
    "result": _json_dump,
    "error": _json_dump,
    "cancel_requested": lambda flag: "1",
}
