"""The serving lane under a hostile or careless tenant, against a real Redis and a tiny model.

Engine-level cases drive the loop's `turn()` by hand (as test_serve_loop.py does), so what shares a
batch is the test's choice: a raising chat template, a failing admission, round-robin admission,
cancellation. End-to-end cases run the real gateway under uvicorn (real sockets, so a client can really
disconnect) in front of a real ServeLoop thread: a noisy neighbour, and a client that goes away.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydantic import TypeAdapter

from protocol import ChatMessage, GenerateEvent, GenerateTask, SamplingParams, keys
from service.settings import GatewaySettings
from tests.helpers import build_model
from tests.integration.servers import serving_thread, uvicorn_gateway
from tests.unit.service.helpers import KEY_A, KEY_B, TENANT_A, auth
from worker.runtime import ModelRuntime
from worker.serving import ServeLoop, ensure_serve_group

pytestmark = pytest.mark.redis
EVENTS: TypeAdapter[GenerateEvent] = TypeAdapter(GenerateEvent)
PROMPTS = ["the cat sat on", "def main():", "a quick brown fox", "import os", "she sells", "for i in"]
# Raises unless roles alternate, as many chat models' templates do.
ALTERNATING = (
    "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}assistant:"
)


@pytest.fixture
def model_dir(tokenizer, tmp_path) -> Path:
    """A tiny llama with a long context (8192 positions), so a generation can outlast a disconnect."""
    path = tmp_path / "tiny-llama-long"
    build_model("llama", tokenizer, max_position_embeddings=8192).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _sampling(tokens: int, **fields: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, ignore_eos=True, **fields)


@pytest.fixture
def make_loop(client, make_settings, tmp_path) -> Callable[..., ServeLoop]:
    def make(**overrides: Any) -> ServeLoop:
        fields = {"serve_max_batch": 8, "serve_batch_window_ms": 0, "max_prompt_tokens": 400} | overrides
        runtime = ModelRuntime(
            cache_dir=tmp_path / "cache", data_root=tmp_path, device="cpu", dtype="float32"
        )
        ensure_serve_group(client)
        loop = ServeLoop(make_settings(**fields), client, runtime)
        loop.cancel_every_s = 0.0  # check for cancellations every turn: the test decides what a turn sees
        return loop

    return make


def _send(client: redis.Redis, model_dir: Path, tenant: str = "t1", **fields: Any) -> str:
    task = GenerateTask(
        request_id=uuid.uuid4().hex,
        tenant=tenant,
        model=str(model_dir),
        enqueued_at=time.time(),
        deadline=time.time() + 60,
        **{"sampling": _sampling(6), **fields},
    )
    client.xadd(keys.GENERATE_STREAM, {"task": task.model_dump_json()})
    return task.request_id


def _events(client: redis.Redis, request_id: str) -> list[Any]:
    raw = client.lrange(keys.GENERATE_REPLY_KEY.format(request_id=request_id), 0, -1)
    return [EVENTS.validate_json(item) for item in raw]


def _done(client: redis.Redis, request_id: str) -> Any:
    events = _events(client, request_id)
    assert events and events[-1].kind == "done", events
    return events[-1]


def _error(client: redis.Redis, request_id: str) -> Any:
    (event,) = _events(client, request_id)
    assert event.kind == "error", event
    return event.error


def _alone(client: redis.Redis, loop: ServeLoop, model_dir: Path, **fields: Any) -> str:
    """The text a request gets with the batch to itself."""
    rid = _send(client, model_dir, **fields)
    assert loop.turn() == 1
    loop.finish()
    return str(_done(client, rid).choices[0].text)


# Engine level ---------------------------------------------------------------------------------------
def test_a_raising_chat_template_fails_only_its_request(client, make_loop, model_dir, tokenizer, tmp_path):
    templated = tmp_path / "templated"
    loop = make_loop()
    loop.runtime.model(str(model_dir)).model.save_pretrained(templated)
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = ALTERNATING
    chat_tokenizer.save_pretrained(templated)

    running = _send(client, templated, prompts=[PROMPTS[0]], sampling=_sampling(10))
    assert loop.turn() == 1  # decoding when the bad request arrives
    user = ChatMessage(role="user", content="hello")
    bad = _send(client, templated, messages=[user, user])
    good = _send(client, templated, messages=[user, ChatMessage(role="assistant", content="hi"), user])
    plain = _send(client, templated, prompts=[PROMPTS[1]])
    assert loop.turn() == 3  # the serving thread would have died here
    loop.finish()
    error = _error(client, bad)
    assert error.type == "InvalidMessages" and "roles must alternate" in error.message
    assert _done(client, good).choices[0].completion_tokens == 6
    assert _done(client, plain).choices[0].completion_tokens == 6
    text = _done(client, running).choices[0].text
    assert text == _alone(client, loop, templated, prompts=[PROMPTS[0]], sampling=_sampling(10))


def test_a_failing_admission_leaves_the_running_rows_alone(client, make_loop, model_dir):
    """A task the contract would refuse (top_k past int64) is refused by the worker as data; one that
    slips past validation fails in its own prefill, and only it: the running row decodes on as alone."""
    loop = make_loop()
    running = _send(client, model_dir, prompts=[PROMPTS[0]], sampling=_sampling(12))
    assert loop.turn() == 1
    raw = json.loads(
        GenerateTask(
            request_id="r" * 32,
            tenant="t2",
            enqueued_at=0,
            deadline=time.time() + 60,
            model=str(model_dir),
            prompts=["hi"],
        ).model_dump_json()
    )
    raw["sampling"] |= {"top_k": 10**22, "temperature": 0.7}
    client.xadd(keys.GENERATE_STREAM, {"task": json.dumps(raw)})
    loop.turn()
    error = _error(client, "r" * 32)
    assert error.type == "InvalidRequest" and "top_k" in error.message

    sampling = SamplingParams.model_construct(
        **(_sampling(4).model_dump() | {"top_k": 10**22, "temperature": 0.7})
    )
    unchecked = GenerateTask.model_construct(
        **GenerateTask(
            request_id="u" * 32,
            tenant="t2",
            model=str(model_dir),
            prompts=["hi"],
            enqueued_at=0,
            deadline=time.time() + 60,
        ).model_dump()
        | {"sampling": sampling}
    )
    loop.engine.admit([unchecked], loop._send)  # the prefill overflows: torch.tensor([10**22])
    assert _error(client, "u" * 32).type == "InternalError"
    assert loop.engine.rows == 1
    loop.finish()
    assert _done(client, running).choices[0].text == _alone(
        client, loop, model_dir, prompts=[PROMPTS[0]], sampling=_sampling(12)
    )


def test_round_robin_admits_another_tenant_at_the_first_free_row(client, make_loop, model_dir):
    """Tenant A saturates a batch of 2 with a backlog of 6; B's request, sent after all of A's, is
    admitted the first turn a row frees (one decode round), not after A's backlog."""
    loop = make_loop(serve_max_batch=2)
    a_ids = [_send(client, model_dir, tenant="A", prompts=[p], sampling=_sampling(3)) for p in PROMPTS]
    assert loop.turn() == 2
    b_id = _send(client, model_dir, tenant="B", prompts=["b"], sampling=_sampling(3))
    first_room = None
    for turn in range(1, 20):
        if first_room is None and loop.engine.rows < 2:
            first_room = turn
        loop.turn()
        if _events(client, b_id):
            break
    # B (3 tokens: prefill and a step, then a step) joined at the first turn with a free row, beside A's
    # third request; A's fourth to sixth still wait.
    assert first_room is not None and turn == first_room + 1
    assert [bool(_events(client, rid)) for rid in a_ids] == [True, True, True, False, False, False]
    # B's burst cannot starve A either: A and B alternate from here.
    b_more = [_send(client, model_dir, tenant="B", prompts=[p], sampling=_sampling(3)) for p in PROMPTS]
    assert loop.turn() == 2
    assert set(loop.engine.request_ids) == {a_ids[3], b_more[0]}
    while loop.engine.model is not None or loop.pending:
        loop.turn()
    for rid in [*a_ids, b_id, *b_more]:
        assert _done(client, rid).choices[0].completion_tokens == 3


def test_cancelled_requests_leave_the_batch_unanswered(client, make_loop, model_dir):
    loop = make_loop(serve_max_batch=2)
    kept = _send(client, model_dir, prompts=[PROMPTS[0]], sampling=_sampling(8))
    gone = _send(client, model_dir, prompts=[PROMPTS[1]], sampling=_sampling(200), stream=True)
    waiting = _send(client, model_dir, prompts=[PROMPTS[2]])
    assert loop.turn() == 2 and len(loop.pending) == 1
    client.zadd(keys.GENERATE_CANCELLED_KEY, {gone: time.time() + 60, waiting: time.time() + 60})
    loop.turn()
    assert loop.engine.request_ids == [kept] and not loop.pending
    loop.finish()
    assert all(e.kind == "delta" for e in _events(client, gone))  # streamed until cancelled, no done
    assert _events(client, waiting) == []
    assert _done(client, kept).choices[0].text == _alone(
        client, loop, model_dir, prompts=[PROMPTS[0]], sampling=_sampling(8)
    )


# End to end: uvicorn gateway + ServeLoop thread --------------------------------------------------------
@pytest.fixture
def server(redis_url, make_settings, model_dir, tmp_path) -> Iterator[ServeLoop]:
    settings = make_settings(serve_max_batch=8, serve_batch_window_ms=5, poll_block_ms=50)
    runtime = ModelRuntime(cache_dir=tmp_path / "cache", data_root=tmp_path, device="cpu", dtype="float32")
    runtime.model(str(model_dir))
    with serving_thread(settings, redis_url, runtime) as loop:
        yield loop


@pytest.fixture
def gateway_url(redis_url, model_dir, tmp_path, server) -> Iterator[str]:
    """The real gateway under uvicorn on a free local port."""
    settings = GatewaySettings(
        redis_url=redis_url,
        data_root=tmp_path,
        models=[str(model_dir)],
        api_keys=f"{KEY_A},{KEY_B}",
        sse_block_ms=200,
        max_new_tokens=8000,
        max_inflight_rows_per_tenant=8,
        allowed_hosts=["127.0.0.1"],  # the Host header a client of this socket sends
    )
    with uvicorn_gateway(settings) as url:
        yield url


def _post(url: str, path: str, body: dict[str, Any], key: str, timeout: float = 120) -> httpx.Response:
    """POST with non-ASCII escaped, so lone surrogates travel as JSON escapes."""
    headers = {"Content-Type": "application/json", **auth(key)}
    return httpx.post(url + path, content=json.dumps(body), headers=headers, timeout=timeout)


def _streamed_text(resp: httpx.Response) -> str:
    """The text of a /v1/generate event stream: the deltas, checked against the final `done`."""
    assert resp.status_code == 200, resp.text
    deltas, done = "", None
    for block in resp.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        if fields["event"] == "delta":
            deltas += json.loads(fields["data"])["text"]
        else:
            assert fields["event"] == "done", block
            done = json.loads(fields["data"])
    assert done is not None and done["text"] == deltas
    return deltas


def test_a_noisy_neighbour_changes_nothing_for_others_and_gets_only_4xx(gateway_url, model_dir):
    model = str(model_dir)
    a_bodies = [
        {"model": model, "prompt": p, "max_new_tokens": 16, "ignore_eos": True, "stream": True}
        for p in [*PROMPTS, "import torch", "the weather"]
    ]
    solo = [_streamed_text(_post(gateway_url, "/v1/generate", body, KEY_A)) for body in a_bodies]

    chat = [{"role": "user", "content": "hi"}]
    bad = [
        ("/v1/generate", {"model": model, "prompt": "hi", "top_k": 10**22, "temperature": 0.7}),
        ("/v1/completions", {"model": model, "prompt": "hi", "top_k": 10**22, "temperature": 0.7}),
        ("/v1/chat/completions", {"model": model, "messages": chat, "top_k": 10**22}),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "\udfff"}]}),
        ("/v1/generate", {"model": model, "messages": [{"role": "user", "content": "\udfff"}]}),
        ("/v1/completions", {"model": model, "prompt": []}),
        ("/v1/completions", {"model": model, "prompt": ["\ud800"]}),
        ("/v1/generate", {"model": model, "prompt": "hi", "stop": ["\ud800"]}),
        ("/v1/generate", {"model": model, "prompt": "hi", "max_new_tokens": 10**30}),
        ("/v1/completions", {"model": model, "prompt": "hi", "n": 10**20, "seed": 2**64}),
    ]
    quick = [
        ("/v1/generate", {"model": model, "prompt": f"b {i}", "max_new_tokens": 2})
        if i % 2
        else ("/v1/completions", {"model": model, "prompt": f"b {i}", "max_tokens": 2})
        for i in range(50)
    ]
    with ThreadPoolExecutor(max_workers=16) as pool:
        a_futures = [pool.submit(_post, gateway_url, "/v1/generate", body, KEY_A) for body in a_bodies]
        bad_futures = [pool.submit(_post, gateway_url, path, body, KEY_B) for path, body in bad]
        quick_futures = [pool.submit(_post, gateway_url, path, body, KEY_B) for path, body in quick]
        a_texts = [_streamed_text(f.result()) for f in a_futures]
        bad_statuses = [f.result().status_code for f in bad_futures]
        quick_statuses = [f.result().status_code for f in quick_futures]
    assert a_texts == solo  # byte for byte what A got alone
    assert bad_statuses == [422] * len(bad)
    assert set(quick_statuses) <= {200, 429} and 200 in quick_statuses


def _replies(client: redis.Redis) -> list[list[Any]]:
    return [
        [EVENTS.validate_json(item) for item in client.lrange(key, 0, -1)]
        for key in client.scan_iter(match=keys.GENERATE_REPLY_KEY.format(request_id="*"))
    ]


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_cancels_its_rows(gateway_url, server, client, model_dir, stream):
    """A generation of 8000 tokens (tens of seconds here) whose client leaves after its first event
    (streamed) or while it waits (whole): the worker drops the row at once, and never answers it."""
    body = {"model": str(model_dir), "prompt": "the cat", "max_new_tokens": 8000, "ignore_eos": True}
    headers = {"Content-Type": "application/json", **auth(KEY_A)}
    if stream:
        with httpx.stream(
            "POST", gateway_url + "/v1/generate", json=body | {"stream": True}, headers=headers, timeout=60
        ) as resp:
            assert resp.status_code == 200
            first = next(resp.iter_lines())
            assert first == "event: delta"
            assert server.engine.rows == 1
        # leaving the block closed the connection mid-stream
    else:
        gone = threading.Event()

        def wait_then_leave() -> None:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(gateway_url + "/v1/generate", json=body, headers=headers, timeout=1.5)
            gone.set()

        caller = threading.Thread(target=wait_then_leave)
        caller.start()
        _wait(lambda: server.engine.rows == 1, "the request to run")
        caller.join(30)
        assert gone.is_set()
    _wait(lambda: server.engine.rows == 0, "the row to leave the batch")
    assert client.zcard(keys.GENERATE_CANCELLED_KEY) == 1
    assert not any(e.kind == "done" for reply in _replies(client) for e in reply)  # dropped, not finished
    assert not client.exists(keys.GENERATE_INFLIGHT_KEY.format(tenant=TENANT_A))
