"""POST /v1/generate against a stand-in serving worker (tests/unit/service/responder.py): what is queued,
the answer whole and streamed, worker errors as statuses, the 504 with no worker, rejections that write
nothing; and `selprune generate` / SelpruneClient.generate on top of it."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from protocol import EMBEDDED_MODEL, ErrorInfo, GenerateDelta, GenerateFailed, keys
from selprune import generate_command
from selprune.cli import main
from selprune.client import ApiError, SelpruneClient
from tests.unit.service.helpers import KEY_A, TENANT_A, TENANT_B, assert_error, auth, put_mask, snapshot
from tests.unit.service.responder import Responder, done_for

pytestmark = pytest.mark.redis


@pytest.fixture
def responder(redis_url):
    with Responder(redis_url) as r:
        yield r


def sse(text: str) -> list[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream body."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_generate_queues_a_task_and_answers(client, r, responder):
    put_mask(r, "m1", "local")
    before = time.time()
    resp = client.post("/v1/generate", json={"prompt": "hello", "mask_id": "m1", "max_new_tokens": 7})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    task = responder.tasks[0]
    assert body == {
        "id": task.request_id,
        "model": EMBEDDED_MODEL,
        "mask_id": "m1",
        "text": " echo 0: hello",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        "timings": {"queue_ms": 1.5, "model_ms": 20.0, "batch_rows": 1},
        "seed": None,  # greedy: no seed needed
    }
    assert task.tenant == "local" and task.model == EMBEDDED_MODEL and task.mask_id == "m1"
    assert task.prompts == ["hello"] and task.messages is None and task.n == 1 and not task.stream
    assert task.sampling.max_new_tokens == 7 and task.sampling.temperature == 0
    assert before <= task.enqueued_at and task.deadline == pytest.approx(task.enqueued_at + 60)
    assert not r.exists(keys.GENERATE_REPLY_KEY.format(request_id=task.request_id))


def test_messages_sampling_and_a_drawn_seed(client, responder):
    req = {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "stop": "\n",
    }
    body = client.post("/v1/generate", json=req).json()
    task = responder.tasks[0]
    assert task.prompts is None and [m.content for m in task.messages] == ["be brief", "hi"]
    assert task.sampling.stop == ["\n"] and task.sampling.top_k == 5 and task.sampling.top_p == 0.9
    # Sampling without a seed: the gateway draws one and says which, so the answer can be reproduced.
    assert isinstance(body["seed"], int) and task.sampling.seed == body["seed"]
    client.post("/v1/generate", json=req | {"seed": 42, "stop": ["a", "b"]})
    assert responder.tasks[1].sampling.seed == 42 and responder.tasks[1].sampling.stop == ["a", "b"]


def test_model_defaults_to_the_masks_model(make_client, r, responder):
    client = make_client(models="gpt2,tiny")
    put_mask(r, "m1", "local", model="tiny")
    assert client.post("/v1/generate", json={"prompt": "x", "mask_id": "m1"}).json()["model"] == "tiny"
    assert client.post("/v1/generate", json={"prompt": "x"}).status_code == 422  # embedded model not served


def test_stream_sends_deltas_then_done(client, r, responder):
    with client.stream("POST", "/v1/generate", json={"prompt": "hello", "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse(resp.read().decode())
    assert [e for e, _ in events] == ["delta", "delta", "done"]
    assert "".join(d["text"] for e, d in events if e == "delta") == events[-1][1]["text"] == " echo 0: hello"
    assert responder.tasks[0].stream
    assert not r.exists(keys.GENERATE_REPLY_KEY.format(request_id=responder.tasks[0].request_id))


@pytest.mark.parametrize(
    ("type", "status"),
    [
        ("MaskNotFound", 404),
        ("MaskNotFoundError", 404),
        ("MaskMismatch", 422),
        ("PromptTooLong", 400),
        ("UnknownModel", 422),
        ("ModelLoadError", 422),
        ("OutOfMemory", 503),
        ("RuntimeError", 500),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_worker_errors_become_statuses(client, responder, type, status, stream):
    responder.handler = lambda task: [GenerateFailed(error=ErrorInfo(type=type, message="from the worker"))]
    resp = client.post("/v1/generate", json={"prompt": "x", "stream": stream})
    assert_error(resp, status, type, "from the worker")  # before any header: a plain error response


def test_error_after_the_first_delta_is_a_last_sse_event(client, responder):
    failed = GenerateFailed(error=ErrorInfo(type="RuntimeError", message="device lost"))
    responder.handler = lambda task: [GenerateDelta(index=0, text="par"), failed]
    resp = client.post("/v1/generate", json={"prompt": "x", "stream": True})
    assert resp.status_code == 200
    assert sse(resp.text) == [
        ("delta", {"text": "par"}),
        ("error", {"error": {"type": "RuntimeError", "message": "device lost"}}),
    ]


def test_no_worker_is_a_504_that_says_so(make_client, r):
    client = make_client(generate_timeout_s=0.2)
    resp = client.post("/v1/generate", json={"prompt": "x"})
    assert_error(resp, 504, "GenerationTimeout", "no serving worker is running", "SELPRUNE_ROLES")
    assert r.xlen(keys.GENERATE_STREAM) == 0  # the unanswered request is withdrawn
    assert_error(client.post("/v1/generate", json={"prompt": "x", "stream": True}), 504, "GenerationTimeout")

    r.set(keys.SERVER_HEARTBEAT_KEY.format(worker_id="w1"), json.dumps({"worker_id": "w1"}))
    assert_error(
        client.post("/v1/generate", json={"prompt": "x"}), 504, "GenerationTimeout", "1 serving worker"
    )


def test_a_stream_that_stalls_ends_with_a_timeout_event(make_client, redis_url):
    client = make_client(generate_timeout_s=0.3)
    with Responder(redis_url, lambda task: [GenerateDelta(index=0, text="half")]):
        resp = client.post("/v1/generate", json={"prompt": "x", "stream": True})
    events = sse(resp.text)
    assert events[0] == ("delta", {"text": "half"})
    assert events[1][0] == "error" and events[1][1]["error"]["type"] == "GenerationTimeout"


def test_another_tenants_mask_is_answered_like_an_unknown_one(authed, r):
    put_mask(r, "theirs", TENANT_B)
    put_mask(r, "mine", TENANT_A, model="gpt2")
    before = snapshot(r)

    def post(**fields):
        return authed.post("/v1/generate", json={"prompt": "x", **fields}, headers=auth(KEY_A))

    hidden = post(mask_id="theirs")
    assert_error(hidden, 404, "MaskNotFound", "theirs")
    assert_error(post(mask_id="mine", model=EMBEDDED_MODEL), 422, "MaskModelMismatch", "gpt2")
    assert_error(authed.post("/v1/generate", json={"prompt": "x"}), 401, "Unauthorized")
    assert snapshot(r) == before
    r.flushdb()  # now "theirs" is unknown to everyone: the answer is the same
    assert post(mask_id="theirs").json() == hidden.json()


REJECTIONS = [
    ({"prompt": "x" * 101}, 400, "PromptTooLong", ["prompt", "101 characters", "100"]),
    ({"messages": [{"role": "user", "content": "y" * 60}] * 2}, 400, "PromptTooLong", ["messages", "120"]),
    ({"max_new_tokens": 65}, 422, "LimitExceeded", ["max_new_tokens = 65", "64"]),
    ({"model": "gpt-9"}, 422, "UnknownModel", ["gpt-9"]),
    ({"mask_id": "nope"}, 404, "MaskNotFound", ["nope"]),
    ({"mask_id": "a:b"}, 404, "MaskNotFound", ["a:b"]),
    ({"stop": ["a", "b", "c", "d", "e"]}, 422, "ValidationError", ["stop"]),
    ({"stop": [""]}, 422, "ValidationError", ["stop"]),
    ({"prompt": ""}, 422, "ValidationError", ["prompt"]),
    ({"prompt": None}, 422, "ValidationError", ["exactly one of prompt and messages"]),
    (
        {"messages": [{"role": "user", "content": "x"}], "prompt": "x"},
        422,
        "ValidationError",
        ["exactly one"],
    ),
    ({"messages": [{"role": "tool", "content": "x"}]}, 422, "ValidationError", ["role"]),
    ({"temperature": 3}, 422, "ValidationError", ["temperature"]),
    ({"seed": -1}, 422, "ValidationError", ["seed"]),
    ({"best_of": 2}, 422, "ValidationError", ["best_of"]),
]


@pytest.mark.parametrize(
    ("overrides", "status", "type", "fragments"), REJECTIONS, ids=[str(e[0])[:40] for e in REJECTIONS]
)
def test_rejections_write_nothing(make_client, r, overrides, status, type, fragments):
    client = make_client(max_prompt_chars=100, max_new_tokens=64)
    r.set("sentinel", "1")
    before = snapshot(r)
    req = ({} if "messages" in overrides else {"prompt": "hello"}) | overrides
    resp = client.post("/v1/generate", json=req)
    assert_error(resp, status, type, *fragments)
    assert snapshot(r) == before


# The Python client and the CLI -------------------------------------------------------------------
class ViaTestClient(httpx.BaseTransport):
    """Sends SelpruneClient's requests through a TestClient (its own transport's responses are not
    plain httpx byte streams)."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.client.request(
            request.method, str(request.url), headers=request.headers, content=request.read()
        )
        return httpx.Response(resp.status_code, headers=resp.headers, content=resp.content)


def test_client_generate_whole_and_streamed(client, responder):
    with SelpruneClient("http://testserver", transport=ViaTestClient(client)) as sp:
        whole = sp.generate({"prompt": "hi"})
        pieces: list[str] = []
        streamed = sp.generate({"prompt": "hi"}, on_text=pieces.append)
        responder.handler = lambda task: [GenerateFailed(error=ErrorInfo(type="MaskNotFound", message="m"))]
        with pytest.raises(ApiError) as exc:
            sp.generate({"prompt": "hi"}, on_text=pieces.append)
    assert whole["text"] == streamed["text"] == "".join(pieces) == " echo 0: hi"
    assert (exc.value.status, exc.value.type) == (404, "MaskNotFound")


@pytest.fixture
def cli_gateway(client, monkeypatch):
    """`selprune generate` talks to the test app."""
    monkeypatch.setattr(
        generate_command,
        "SelpruneClient",
        lambda url, key: SelpruneClient(url, key, transport=ViaTestClient(client)),
    )
    return ["--url", "http://testserver"]


def test_cli_generate_streams_to_stdout(cli_gateway, responder, capsys):
    assert main(["generate", "hello there", *cli_gateway]) == 0
    captured = capsys.readouterr()
    assert captured.out == " echo 0: hello there\n"
    assert (
        captured.err
        == "finish: length; 3 prompt + 4 completion tokens; queue 2 ms, model 20 ms (batch of 1 row(s))\n"
    )
    assert responder.tasks[-1].stream

    assert main(["generate", "hello there", "--no-stream", *cli_gateway]) == 0
    assert capsys.readouterr().out == " echo 0: hello there\n"
    assert not responder.tasks[-1].stream

    assert main(["generate", "x", "--mask", "nope", *cli_gateway]) == 1
    assert "404 MaskNotFound" in capsys.readouterr().err


def test_cli_passes_every_option(cli_gateway, r, responder, capsys):
    put_mask(r, "m1", "local")
    responder.handler = lambda task: [done_for(task, ["ok"], "stop")]
    argv = ["generate", "p", "--mask", "m1", "--model", EMBEDDED_MODEL, "--max-new-tokens", "5"]
    argv += ["--temperature", "0.5", "--top-p", "0.8", "--top-k", "4", "--seed", "3"]
    assert main([*argv, "--stop", ".", "--stop", "!", *cli_gateway]) == 0
    task = responder.tasks[-1]
    assert task.mask_id == "m1" and task.model == EMBEDDED_MODEL and task.prompts == ["p"] and task.stream
    s = task.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (5, 0.5, 0.8, 4, 3)
    assert s.stop == [".", "!"] and capsys.readouterr().out == "ok\n"
