"""The SSE parser, error mapping and event-stream reconnection of SelpruneClient."""

from __future__ import annotations

import httpx
import pytest

from selprune.client import ApiError, GatewayUnreachableError, SelpruneClient, SseEvent, SseParser

STREAM = (
    b"\xef\xbb\xbf: keep-alive\r\n\r\n"
    b'id: 1-0\r\nevent: progress\r\ndata: {"phase": "evaluating", "step": 0}\r\n\r\n'
    b'event: step\nid: 2-0\ndata: {"step": 1,\ndata:  "name": "caf\xc3\xa9"}\n\n'
    b"retry: 500\rdata:plain text\r\r"
    b"event: ignored-without-data\n\n"
    b'event: state\nid: 3-0\ndata: {"state": "succeeded"}\n\n'
    b"data: incomplete, never dispatched\n"
)
EXPECTED = [
    SseEvent("progress", '{"phase": "evaluating", "step": 0}', "1-0"),
    SseEvent("step", '{"step": 1,\n "name": "café"}', "2-0"),
    SseEvent("message", "plain text", "2-0", 500),
    SseEvent("state", '{"state": "succeeded"}', "3-0"),
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(STREAM)])
def test_sse_parser_any_chunking(size):
    parser = SseParser()
    events = [e for i in range(0, len(STREAM), size) for e in parser.feed(STREAM[i : i + size])]
    assert events == EXPECTED
    assert events[1].json() == {"step": 1, "name": "café"}
    assert events[2].json() == "plain text"
    assert parser.last_event_id == "3-0"


def _client(handler):
    return SelpruneClient("http://gw.test/", "k3y", transport=httpx.MockTransport(handler))


def test_api_error_from_error_body():
    def handler(request):
        assert request.headers["authorization"] == "Bearer k3y"
        return httpx.Response(404, json={"error": {"type": "JobNotFound", "message": "no job x"}})

    with _client(handler) as client, pytest.raises(ApiError) as exc:
        client.job("x")
    assert (exc.value.status, exc.value.type, exc.value.message) == (404, "JobNotFound", "no job x")


def test_unreachable_gateway_names_the_url():
    client = SelpruneClient("http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(GatewayUnreachableError, match=r"http://127\.0\.0\.1:9"):
        client.job("x")
    assert not client.healthy()


class _Dropping(httpx.SyncByteStream):
    """Yields its chunks, then fails as a dropped connection does."""

    def __init__(self, chunks):
        self.chunks = chunks

    def __iter__(self):
        yield from self.chunks
        raise httpx.RemoteProtocolError("peer closed connection")


def test_events_reconnect_with_last_event_id(monkeypatch):
    monkeypatch.setattr("selprune.client.time.sleep", lambda _s: None)
    seen = []

    def handler(request):
        seen.append(request.headers.get("last-event-id"))
        if len(seen) == 1:
            first = b'id: 1-0\nevent: progress\ndata: {"phase": "scoring"}\n\nid: 2-0\ndata: {"half'
            return httpx.Response(200, stream=_Dropping([first]))
        body = b'id: 3-0\nevent: step\ndata: {"type": "step", "report": {"step": 1}}\n\n'
        body += b'id: 4-0\nevent: state\ndata: {"state": "failed", "error": {"type": "E"}}\n\n'
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    with _client(handler) as client:
        events = list(client.events("job-1"))
    assert seen == [None, "1-0"]
    assert events == [
        ("progress", {"phase": "scoring"}),
        ("step", {"step": 1}),  # the worker's {"type": "step", "report": ...} is unwrapped
        ("state", {"state": "failed", "error": {"type": "E"}}),
    ]


def test_events_fall_back_to_polling(monkeypatch):
    monkeypatch.setattr("selprune.client.time.sleep", lambda _s: None)
    report = {"step": 0, "metrics": {}}

    def handler(request):
        if request.url.path.endswith("/events"):
            return httpx.Response(503, json={"error": {"type": "QueueUnavailable", "message": "down"}})
        return httpx.Response(200, json={"state": "succeeded", "metrics": [report]})

    with _client(handler) as client:
        events = list(client.events("job-1", max_retries=1))
    assert events == [("step", report), ("state", {"state": "succeeded", "metrics": [report]})]
