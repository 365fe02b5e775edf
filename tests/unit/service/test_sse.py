"""The gateway's SSE framing (service/sse.py): exact bytes, what the client's parser reads back, the
response's headers; and the routes' import rule (no router imports another)."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from selprune.client import SseEvent, SseParser
from service.sse import KEEP_ALIVE, EventStreamResponse, format_event


@pytest.mark.parametrize(
    ("args", "kwargs", "frame"),
    [
        (["[DONE]"], {}, "data: [DONE]\n\n"),
        (['{"text": "a"}'], {"event": "delta"}, 'event: delta\ndata: {"text": "a"}\n\n'),
        (["{}"], {"event": "step", "id": "1-0"}, "id: 1-0\nevent: step\ndata: {}\n\n"),
        ([""], {"event": "progress"}, "event: progress\ndata: \n\n"),
        (["a\nb\r\nc\rd"], {}, "data: a\ndata: b\ndata: c\ndata: d\n\n"),
        (["tail\n"], {}, "data: tail\ndata: \n\n"),
        (["x"], {"event": "st\r\nate", "id": "1\n-0"}, "id: 1-0\nevent: state\ndata: x\n\n"),
        # Only CR and LF break lines in an event stream; other Unicode line separators are data.
        (["a\u2028b\x85c"], {}, "data: a\u2028b\x85c\n\n"),
    ],
)
def test_format_event_bytes(args, kwargs, frame):
    assert format_event(*args, **kwargs) == frame


@pytest.mark.parametrize(
    "data", ["", "plain", '{"json": true}', "two\nlines", "crlf\r\nand cr\rend\n", "é\u2028"]
)
def test_the_clients_parser_reads_back_what_was_framed(data):
    stream = (KEEP_ALIVE + format_event(data, event="step", id="7-1") + KEEP_ALIVE).encode()
    parser = SseParser()
    # CR and CRLF arrive as LF, as the SSE spec has every client read them.
    expected = data.replace("\r\n", "\n").replace("\r", "\n")
    assert list(parser.events([stream[i : i + 3] for i in range(0, len(stream), 3)])) == [
        SseEvent("step", expected, "7-1")
    ]
    assert parser.last_event_id == "7-1"


def test_event_stream_response_headers_and_body():
    async def frames():
        yield format_event("1", event="delta")
        yield KEEP_ALIVE
        yield format_event("[DONE]")

    async def endpoint(request):
        return EventStreamResponse(frames())

    with TestClient(Starlette(routes=[Route("/s", endpoint)])) as client:
        resp = client.get("/s")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-accel-buffering"] == "no"
    assert set(resp.headers) == {"content-type", "cache-control", "x-accel-buffering"}  # nothing more
    assert resp.text == "event: delta\ndata: 1\n\n: keep-alive\n\ndata: [DONE]\n\n"


async def _nothing():
    return
    yield


def test_event_stream_response_extra_headers_win():
    response = EventStreamResponse(_nothing(), headers={"Cache-Control": "no-store", "X-Other": "1"})
    assert response.headers["cache-control"] == "no-store" and response.headers["x-other"] == "1"
    assert response.headers["x-accel-buffering"] == "no"
