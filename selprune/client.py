"""A small synchronous client for the selprune gateway, over httpx.

`SelpruneClient(url, api_key)` wraps the routes the CLI uses. Errors come back as exceptions:
`ApiError(status, type, message)` for a non-2xx answer (read from the gateway's `{"error": {...}}` body)
and `GatewayUnreachableError` when nothing answers at the URL. Server-sent events are parsed by
`SseParser`, and `events()` reconnects with `Last-Event-ID` when the connection drops.

The parser is ours, not httpx-sse's: that one dispatches events without data (so every keep-alive
comment after an `id:` would reach the caller as an empty "message"), refuses a response without a
text/event-stream content type, and moves the last event id on before an event is complete, while
resuming must start after the last event actually received.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

log = logging.getLogger(__name__)

FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})
_EOL = re.compile(r"\r\n|\r|\n")


class ClientError(Exception):
    """Base class of what SelpruneClient raises."""


class GatewayUnreachableError(ClientError):
    """Nothing answered at the gateway URL (connection refused, DNS failure, timeout)."""


class ApiError(ClientError):
    """The gateway answered with a non-2xx status; `type` and `message` come from its error body."""

    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(f"HTTP {status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message


# --- server-sent events ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SseEvent:
    event: str  # "message" when the stream gave no `event:` field
    data: str  # the data lines joined by "\n"
    id: str | None = None  # the stream's last event id when this event was dispatched
    retry: int | None = None  # reconnection delay the server asked for (ms)

    def json(self) -> Any:
        """The data parsed as JSON, or the raw string if it is not JSON."""
        try:
            return json.loads(self.data)
        except ValueError:
            return self.data


class SseParser:
    """Incremental parser of a text/event-stream (WHATWG HTML, "Interpreting an event stream").

    Feed it bytes as they arrive, in chunks of any size; it returns the events completed by each chunk.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._skip_lf = False  # the previous chunk ended in "\r": a leading "\n" completes that CRLF
        self._first = True  # a UTF-8 BOM is allowed before the first line
        self._event = ""
        self._data: list[str] = []
        self._retry: int | None = None
        self._id: str | None = None  # the id field seen so far; becomes last_event_id on dispatch
        self.last_event_id: str | None = None  # the id to resume from: that of the last complete event

    def feed(self, chunk: bytes) -> list[SseEvent]:
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if self._first:
            text, self._first = text.removeprefix("\ufeff"), False
        if self._skip_lf:
            text, self._skip_lf = text.removeprefix("\n"), False
        self._buf += text
        events: list[SseEvent] = []
        while (match := _EOL.search(self._buf)) is not None:
            line = self._buf[: match.start()]
            if match.group() == "\r" and match.end() == len(self._buf):
                self._skip_lf = True  # maybe the first half of a CRLF split across chunks
            self._buf = self._buf[match.end() :]
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def events(self, chunks: Iterable[bytes]) -> Iterator[SseEvent]:
        """The events of a byte stream, each as soon as its chunk completes it."""
        for chunk in chunks:
            yield from self.feed(chunk)

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):  # a comment, e.g. a keep-alive ping
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SseEvent | None:
        event, data, retry = self._event, self._data, self._retry
        self._event, self._data, self._retry = "", [], None
        self.last_event_id = self._id
        if not data:
            return None
        return SseEvent(event or "message", "\n".join(data), self.last_event_id, retry)


# --- the client -----------------------------------------------------------------------------------------
class SelpruneClient:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SelpruneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Routes ----------------------------------------------------------------------------------------
    def submit_unlearn(self, body: dict[str, Any]) -> str:
        """POST /v1/unlearn (body: service.schemas.UnlearnRequest); returns the job's id."""
        data = self._request("POST", "/v1/unlearn", json=body)
        return str(data["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}: state, phase, step, metrics, mask_id, error."""
        return self._request("GET", f"/v1/jobs/{quote(job_id, safe='')}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """DELETE /v1/jobs/{id}."""
        return self._request("DELETE", f"/v1/jobs/{quote(job_id, safe='')}")

    def mask(self, mask_id: str) -> dict[str, Any]:
        """GET /v1/masks/{id}: the mask's metadata."""
        return self._request("GET", f"/v1/masks/{quote(mask_id, safe='')}")

    def generate(self, body: dict[str, Any], on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
        """POST /v1/generate (body: service.schemas.GenerateRequest); returns the whole response (text,
        finish_reason, usage, timings, seed). With `on_text` it streams, handing each piece of text to
        `on_text` as it arrives; an error after the stream began raises ApiError with status 500."""
        # The gateway answers 504 itself when no worker does; this only guards against a hung gateway.
        timeout = httpx.Timeout(10.0, read=600.0)
        if on_text is None:
            return self._request("POST", "/v1/generate", json={**body, "stream": False}, timeout=timeout)
        headers = {"Accept": "text/event-stream"}
        try:
            with self._http.stream(
                "POST", "/v1/generate", json={**body, "stream": True}, headers=headers, timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _api_error(response)
                for event in SseParser().events(response.iter_bytes()):
                    data = event.json()
                    data = data if isinstance(data, dict) else {}
                    if event.event == "delta":
                        on_text(str(data.get("text", "")))
                    elif event.event == "done":
                        return data
                    elif event.event == "error":
                        error = data.get("error") or {}
                        raise ApiError(500, str(error.get("type", "Error")), str(error.get("message", "")))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        raise ClientError("the generation stream ended without a done event")

    def classify(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/classify (body: service.image_schemas.ClassifyRequest): per image, the top classes."""
        return self._request("POST", "/v1/classify", json=body, timeout=httpx.Timeout(10.0, read=600.0))

    def fill_mask(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/fill-mask (body: service.fill_mask_schemas.FillMaskRequest): per input, per mask
        position, the top tokens."""
        return self._request("POST", "/v1/fill-mask", json=body, timeout=httpx.Timeout(10.0, read=600.0))

    def healthy(self) -> bool:
        """True if a gateway answers 200 on /healthz."""
        return self._probe("/healthz")

    def ready(self) -> bool:
        """True if the gateway answers 200 on /readyz (Redis reachable and a worker alive)."""
        return self._probe("/readyz")

    def events(
        self, job_id: str, *, max_retries: int = 5, poll_interval: float = 2.0
    ) -> Iterator[tuple[str, Any]]:
        """Follow GET /v1/jobs/{id}/events, yielding (event, data) until the job finishes.

        Events are "progress" (phase, step, steps, tokens), "step" (data: the step report itself) and
        "state" (state, and the error of a failed job).

        A dropped connection is resumed with Last-Event-ID. After `max_retries` failures in a row, or
        if the gateway has no events route, it polls GET /v1/jobs/{id} instead (progress events plus a
        step event per new step report), as long as that answers.
        """
        path = f"/v1/jobs/{quote(job_id, safe='')}/events"
        last_id: str | None = None
        failures = 0
        seen_step = -1  # highest step whose report was yielded
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            parser = SseParser()
            delay_ms: int | None = None
            try:
                # No read timeout would hide a dead connection; a quiet stream just reconnects.
                timeout = httpx.Timeout(10.0, read=60.0)
                with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                    if response.status_code == 404 or response.status_code == 405:
                        response.read()
                        self.job(job_id)  # raises ApiError if the job itself does not exist
                        yield from self._poll(job_id, seen_step, poll_interval)
                        return
                    if response.status_code >= 400:
                        response.read()
                        error = _api_error(response)
                        if response.status_code < 500:
                            raise error
                        raise httpx.TransportError(str(error))  # a 5xx is worth a retry
                    for event in parser.events(response.iter_bytes()):
                        failures = 0
                        delay_ms = event.retry or delay_ms
                        data = event.json()
                        if event.event == "step" and isinstance(data, dict):
                            # The worker wraps the report: {"type": "step", "report": {...}}.
                            report = data.get("report")
                            data = report if isinstance(report, dict) else data
                            seen_step = max(seen_step, int(data.get("step") or 0))
                        yield event.event, data
                        if _is_final(event.event, data):
                            return
                    last_id = parser.last_event_id or last_id
            except (httpx.TransportError, httpx.DecodingError) as exc:
                last_id = parser.last_event_id or last_id
                failures += 1
                if failures > max_retries:
                    log.warning("the event stream of job %s keeps failing (%s); polling instead", job_id, exc)
                    yield from self._poll(job_id, seen_step, poll_interval)
                    return
                log.info("event stream dropped (%s); reconnecting (try %d)", exc, failures)
            else:
                # The stream ended without a final state: ask whether the job is done, else reconnect.
                status = self.job(job_id)
                if str(status.get("state")) in FINISHED_STATES:
                    yield "state", status
                    return
            time.sleep(min(10.0, (delay_ms or 1000) / 1000 * max(1, failures)))

    def _poll(self, job_id: str, seen_step: int, interval: float) -> Iterator[tuple[str, Any]]:
        """Stand-in for the event stream, from GET /v1/jobs/{id}: ("step", report) for each report past
        `seen_step`, ("progress", status), and finally ("state", status)."""
        while True:
            status = self.job(job_id)
            for report in status.get("metrics") or []:
                if isinstance(report, dict) and int(report.get("step") or 0) > seen_step:
                    seen_step = int(report.get("step") or 0)
                    yield "step", report
            if str(status.get("state")) in FINISHED_STATES:
                yield "state", status
                return
            yield "progress", status
            time.sleep(interval)

    # Plumbing --------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise _api_error(response)
        if not response.content:
            return {}
        data = response.json()
        return data if isinstance(data, dict) else {"data": data}

    def _probe(self, path: str) -> bool:
        try:
            return self._http.get(path, timeout=3.0).status_code == 200
        except httpx.TransportError:
            return False

    def _unreachable(self, exc: Exception) -> GatewayUnreachableError:
        return GatewayUnreachableError(
            f"cannot reach the selprune gateway at {self.url} ({exc}); start one with `selprune up` "
            "or point SELPRUNE_URL / --url at a running one"
        )


def _is_final(event: str, data: Any) -> bool:
    return event == "state" and isinstance(data, dict) and str(data.get("state")) in FINISHED_STATES


def _api_error(response: httpx.Response) -> ApiError:
    """ApiError from the gateway's `{"error": {"type", "message"}}` body, or from the raw text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return ApiError(response.status_code, str(error.get("type", "Error")), str(error.get("message", "")))
    if isinstance(body, dict) and "detail" in body:  # FastAPI's default shape, e.g. for an unknown route
        return ApiError(response.status_code, "HTTPError", json.dumps(body["detail"]))
    text = response.text.strip()[:500] or response.reason_phrase
    return ApiError(response.status_code, "HTTPError", text)
