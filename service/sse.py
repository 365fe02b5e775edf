"""Server-sent events: how one event is framed, and the response that streams them.

Every stream of the gateway is framed here: job events (`id:`, `event:`, keep-alive comments),
`/v1/generate` (`event: delta|done|error`) and the OpenAI-compatible streams (bare `data:` lines ending
with `data: [DONE]`). Framing follows WHATWG HTML, "Server-sent events": fields are written `name: value`
and separated by "\\n", a blank line ends the event, and data holding line breaks becomes one `data:` line
per line, so a client that joins them with "\\n" gets the text back. An id or event name loses its line
breaks, which would otherwise end the field early.

We frame by hand rather than with sse-starlette: it writes "\\r\\n" and `Cache-Control: no-store` by
default, adds `Connection: keep-alive` and a timestamped ping of its own, and patches uvicorn's exit
handler on import, while starlette's `StreamingResponse` already stops the stream when the client
disconnects. What we need is the dozen lines below.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, Mapping

from starlette.responses import StreamingResponse

MEDIA_TYPE = "text/event-stream"
# Proxies and browsers must neither cache the stream nor buffer it (X-Accel-Buffering is nginx's switch).
HEADERS: Mapping[str, str] = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# A comment line: clients ignore it, and it keeps idle connections (and their proxies) from timing out.
KEEP_ALIVE = ": keep-alive\n\n"

_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the only line breaks of an event stream


def format_event(data: str, *, event: str | None = None, id: str | None = None) -> str:
    """One event: `id:` and `event:` when given, a `data:` line per line of `data`, then a blank line."""
    lines = [] if id is None else [f"id: {_LINE_BREAK.sub('', id)}"]
    if event is not None:
        lines.append(f"event: {_LINE_BREAK.sub('', event)}")
    lines += [f"data: {line}" for line in _LINE_BREAK.split(data)]
    return "\n".join(lines) + "\n\n"


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response of framed events (strings from `format_event`, or `KEEP_ALIVE`),
    sent without caching or proxy buffering."""

    media_type = MEDIA_TYPE

    def __init__(self, content: AsyncIterable[str], headers: Mapping[str, str] | None = None) -> None:
        super().__init__(content, headers={**HEADERS, **(headers or {})})
