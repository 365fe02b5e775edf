"""The serving lane's gateway limits against a stand-in serving worker (tests/unit/service/responder.py):
every numeric field bounded and every text valid Unicode (a clear 422 naming the field, nothing
written), the per-tenant cap on rows in flight (429 + Retry-After), a full generate stream (503 +
Retry-After, nothing trimmed), worker rejections of the caller's input as 422, and a request the
gateway stops waiting for cancelled on the worker."""

from __future__ import annotations

import json
import threading
import time

import pytest

from protocol import EMBEDDED_MODEL, ErrorInfo, GenerateFailed, GenerateTask, keys
from tests.unit.service.helpers import KEY_A, KEY_B, TENANT_A, assert_error, auth, snapshot
from tests.unit.service.responder import Responder, echo

pytestmark = pytest.mark.redis
M = EMBEDDED_MODEL
CHAT = [{"role": "user", "content": "hi"}]


def post(client, path: str, body: dict, key: str | None = None):
    """POST `body` as JSON with non-ASCII escaped, so lone surrogates travel as JSON "\\udXXX" escapes
    (httpx's own encoder would fail on them before sending)."""
    headers = {"Content-Type": "application/json", **(auth(key) if key else {})}
    return client.post(path, content=json.dumps(body), headers=headers)


BAD = [
    # (path, body, fragments of the message)
    ("/v1/generate", {"prompt": "hi", "top_k": 10**22, "temperature": 0.7}, ["top_k", "1000000"]),
    ("/v1/generate", {"prompt": "hi", "max_new_tokens": 10**30}, ["max_new_tokens"]),
    ("/v1/generate", {"prompt": "hi", "seed": 2**63, "temperature": 0.5}, ["seed"]),
    ("/v1/generate", {"prompt": "hi", "stop": ["x" * 257]}, ["stop"]),
    ("/v1/generate", {"prompt": "\ud800 hi"}, ["prompt", "U+D800"]),
    (
        "/v1/generate",
        {"messages": [{"role": "user", "content": "\udfff"}]},
        ["messages[0].content", "U+DFFF"],
    ),
    ("/v1/generate", {"prompt": "hi", "stop": ["\udc00"]}, ["stop[0]"]),
    ("/v1/generate", {"prompt": "hi", "\ud800": 1}, ["field name"]),
    ("/v1/completions", {"model": M, "prompt": "hi", "top_k": 10**22}, ["top_k"]),
    ("/v1/completions", {"model": M, "prompt": "hi", "n": 10**20}, ["n"]),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 10**20}, ["max_tokens"]),
    ("/v1/completions", {"model": M, "prompt": []}, ["prompt", "empty list"]),
    ("/v1/completions", {"model": M, "prompt": ["\ud800"]}, ["prompt[0]", "U+D800"]),
    ("/v1/completions", {"model": M, "prompt": "hi", "stop": "\ud800"}, ["stop"]),
    ("/v1/completions", {"model": "\ud800", "prompt": "hi"}, ["model"]),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "\udfff"}]}, ["content"]),
    (
        "/v1/chat/completions",
        {"model": M, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
        ["messages[0].content[0].text"],
    ),
    ("/v1/chat/completions", {"model": M, "messages": CHAT, "top_k": 10**22}, ["top_k"]),
    ("/v1/chat/completions", {"model": M, "messages": CHAT, "max_completion_tokens": 10**20}, ["max_"]),
]


@pytest.mark.parametrize(("path", "body", "fragments"), BAD, ids=[f"{p}-{str(b)[:40]}" for p, b, _ in BAD])
def test_unbounded_numbers_and_invalid_text_are_422_naming_the_field(make_client, r, path, body, fragments):
    client = make_client(max_new_tokens=64)
    r.set("sentinel", "1")
    before = snapshot(r)
    assert_error(post(client, path, body), 422, "ValidationError", *fragments)
    assert snapshot(r) == before


def test_nan_and_infinity_are_refused(client, r):
    for raw in ('{"prompt": "hi", "temperature": NaN}', '{"prompt": "hi", "top_p": Infinity}'):
        resp = client.post("/v1/generate", content=raw, headers={"Content-Type": "application/json"})
        assert resp.status_code == 422, resp.text


def test_a_tenant_past_its_rows_in_flight_gets_429_and_others_do_not(make_client, r, redis_url):
    """Two held requests fill tenant A's cap of 2 rows: A's third is 429 with Retry-After, tenant B is
    served, and once A's requests end (here by timing out) A is served again."""
    client = make_client(api_keys=f"{KEY_A},{KEY_B}", max_inflight_rows_per_tenant=2, generate_timeout_s=1.5)

    def handler(task: GenerateTask):
        return [] if task.prompts == ["hold"] else echo(task)  # "hold": never answered

    with Responder(redis_url, handler) as responder:
        held = [
            threading.Thread(target=post, args=(client, "/v1/generate", {"prompt": "hold"}, KEY_A))
            for _ in range(2)
        ]
        for t in held:
            t.start()
        deadline = time.monotonic() + 5
        while len(responder.tasks) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(responder.tasks) == 2
        busy = post(client, "/v1/generate", {"prompt": "x"}, KEY_A)
        assert_error(busy, 429, "TooManyRequests", "2 generation rows in flight", "limit is 2")
        assert busy.headers["Retry-After"] == "1"
        assert post(client, "/v1/completions", {"model": M, "prompt": "x"}, KEY_B).status_code == 200
        assert_error(
            post(client, "/v1/completions", {"model": M, "prompt": ["a", "b", "c"]}, KEY_B),
            422,
            "LimitExceeded",
            "3 completions",
        )
        for t in held:
            t.join(10)
        assert post(client, "/v1/generate", {"prompt": "x"}, KEY_A).status_code == 200
    assert not r.exists(keys.GENERATE_INFLIGHT_KEY.format(tenant=TENANT_A))  # every hold released
    # The two held requests were abandoned (timeout): both are marked cancelled for the worker.
    cancelled = {m.decode() for m in r.zrange(keys.GENERATE_CANCELLED_KEY, 0, -1)}
    assert cancelled == {t.request_id for t in responder.tasks if t.prompts == ["hold"]}


def test_a_full_generate_stream_answers_503_and_drops_nothing(make_client, r):
    client = make_client(generate_timeout_s=0.5)
    with r.pipeline(transaction=False) as pipe:
        for i in range(keys.GENERATE_STREAM_MAXLEN):
            pipe.xadd(keys.GENERATE_STREAM, {"task": f"waiting {i}"})
        pipe.execute()
    first = r.xrange(keys.GENERATE_STREAM, count=1)[0][0]
    for path, body in (
        ("/v1/generate", {"prompt": "x"}),
        ("/v1/generate", {"prompt": "x", "stream": True}),
        ("/v1/chat/completions", {"model": M, "messages": CHAT}),
    ):
        resp = post(client, path, body)
        assert_error(resp, 503, "ServingQueueFull", "already waiting")
        assert int(resp.headers["Retry-After"]) > 0
    assert r.xlen(keys.GENERATE_STREAM) == keys.GENERATE_STREAM_MAXLEN  # nobody's request was trimmed
    assert r.xrange(keys.GENERATE_STREAM, count=1)[0][0] == first
    assert not r.exists(keys.GENERATE_INFLIGHT_KEY.format(tenant="local"))


@pytest.mark.parametrize("stream", [False, True])
def test_worker_rejections_of_the_callers_input_are_422(client, redis_url, stream):
    failure = ErrorInfo(type="InvalidMessages", message="the model's chat template refused the messages: no")
    with Responder(redis_url, lambda task: [GenerateFailed(error=failure)]):
        resp = post(client, "/v1/generate", {"messages": CHAT, "stream": stream})
        assert_error(resp, 422, "InvalidMessages", "chat template refused")
        resp = post(client, "/v1/chat/completions", {"model": M, "messages": CHAT, "stream": stream})
        assert_error(resp, 422, "InvalidMessages", "chat template refused")
