"""The OpenAI-compatible routes, driven by the official `openai` client (over the TestClient) against a
stand-in serving worker: shapes whole and streamed, `<model>@<mask_id>`, /v1/models per tenant,
rejections that write nothing, and errors as the client's exception classes."""

from __future__ import annotations

import json

import openai
import pytest

from protocol import EMBEDDED_MODEL, ErrorInfo, GenerateDelta, GenerateFailed
from tests.unit.service.helpers import KEY_A, KEY_B, TENANT_A, TENANT_B, assert_error, put_mask, snapshot
from tests.unit.service.responder import Responder

pytestmark = pytest.mark.redis
M = EMBEDDED_MODEL


@pytest.fixture
def responder(redis_url):
    with Responder(redis_url) as r:
        yield r


def oai(http_client, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http_client, max_retries=0)


def data_lines(text: str) -> list:
    """The `data:` payloads of a stream, JSON-decoded except the final [DONE]."""
    out = []
    for block in text.strip().split("\n\n"):
        data = block.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_completions(client, r, responder):
    put_mask(r, "m1", "local")
    resp = oai(client).completions.create(model=f"{M}@m1", prompt="hello", seed=7)
    task = responder.tasks[0]
    assert (
        resp.id == f"cmpl-{task.request_id}" and resp.object == "text_completion" and resp.model == f"{M}@m1"
    )
    assert [(c.index, c.text, c.finish_reason) for c in resp.choices] == [(0, " echo 0: hello", "length")]
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (3, 3, 6)
    assert task.model == M and task.mask_id == "m1" and task.prompts == ["hello"] and not task.stream
    s = task.sampling  # OpenAI's defaults: 16 tokens, temperature 1
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (16, 1.0, 1.0, 0, 7, [])

    many = oai(client).completions.create(
        model=M, prompt=["a", "b"], n=2, max_tokens=5, stop="\n", temperature=0
    )
    assert [c.text for c in many.choices] == [" echo 0: a", " echo 1: a", " echo 2: b", " echo 3: b"]
    task = responder.tasks[1]
    assert task.rows == 4 and task.mask_id is None and task.sampling.stop == ["\n"]
    assert (task.sampling.max_new_tokens, task.sampling.temperature) == (5, 0.0)


def test_completions_stream(client, responder):
    raw = client.post("/v1/completions", json={"model": M, "prompt": ["a", "b"], "stream": True})
    lines = data_lines(raw.text)
    assert lines[-1] == "[DONE]" and all(c["object"] == "text_completion" for c in lines[:-1])
    assert all("usage" not in c for c in lines[:-1])  # only with stream_options.include_usage
    finals = [c["choices"][0] for c in lines[:-1] if c["choices"][0]["finish_reason"]]
    assert [(f["index"], f["finish_reason"]) for f in finals] == [(0, "length"), (1, "length")]

    stream = oai(client).completions.create(
        model=M, prompt="hello", n=2, stream=True, stream_options={"include_usage": True}
    )
    texts, usage = {0: "", 1: ""}, None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert texts == {0: " echo 0: hello", 1: " echo 1: hello"} and usage.total_tokens == 12


def test_chat_completions(make_client, responder):
    client = make_client(max_new_tokens=100)
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
    ]
    resp = oai(client).chat.completions.create(model=M, messages=messages, n=2, temperature=0.5, seed=1)
    assert (
        resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.usage.total_tokens == 14
    )
    assert [(c.index, c.message.role, c.message.content, c.finish_reason) for c in resp.choices] == [
        (0, "assistant", " echo 0: hi there", "length"),
        (1, "assistant", " echo 1: hi there", "length"),
    ]
    task = responder.tasks[0]
    assert [(m.role, m.content) for m in task.messages] == [("system", "be brief"), ("user", "hi there")]
    assert task.n == 2 and task.sampling.max_new_tokens == 100  # no max tokens: the gateway's cap

    oai(client).chat.completions.create(model=M, messages=messages, max_tokens=9)
    oai(client).chat.completions.create(model=M, messages=messages, max_tokens=9, max_completion_tokens=8)
    assert [t.sampling.max_new_tokens for t in responder.tasks[1:]] == [9, 8]


def test_chat_stream_chunks(client, responder):
    body = {"model": M, "messages": [{"role": "user", "content": "yo"}], "stream": True}
    lines = data_lines(client.post("/v1/chat/completions", json=body).text)
    assert lines[-1] == "[DONE]" and {c["object"] for c in lines[:-1]} == {"chat.completion.chunk"}
    choices = [c["choices"][0] for c in lines[:-1]]
    assert choices[0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    assert "".join(c["delta"].get("content", "") for c in choices) == " echo 0: yo"
    assert choices[-1] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}

    stream = oai(client).chat.completions.create(
        model=M,
        messages=[{"role": "user", "content": "yo"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " echo 0: yo"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_error_mid_stream_is_a_last_data_line(client, responder):
    failed = GenerateFailed(error=ErrorInfo(type="RuntimeError", message="device lost"))
    responder.handler = lambda task: [GenerateDelta(index=0, text="par"), failed]
    body = {"model": M, "messages": [{"role": "user", "content": "x"}], "stream": True}
    lines = data_lines(client.post("/v1/chat/completions", json=body).text)
    assert lines[-2:] == [{"error": {"type": "RuntimeError", "message": "device lost"}}, "[DONE]"]
    with pytest.raises(openai.APIError, match="device lost"):
        list(oai(client).chat.completions.create(**body))


def test_worker_error_before_the_stream_is_a_status(client, responder):
    responder.handler = lambda task: [
        GenerateFailed(error=ErrorInfo(type="PromptTooLong", message="9 tokens"))
    ]
    with pytest.raises(openai.BadRequestError, match="9 tokens"):
        oai(client).completions.create(model=M, prompt="x", stream=True)


def test_no_worker_is_504(make_client):
    client = make_client(generate_timeout_s=0.2)
    with pytest.raises(openai.InternalServerError) as exc:
        oai(client).completions.create(model=M, prompt="x")
    assert exc.value.status_code == 504 and "no serving worker is running" in exc.value.message


def test_models_lists_each_tenants_masks(make_client, r):
    client = make_client(api_keys=f"{KEY_A},{KEY_B}", models=f"{M},gpt2")
    put_mask(r, "ma", TENANT_A)
    put_mask(r, "mb", TENANT_B, model="gpt2")
    put_mask(r, "unserved", TENANT_A, model="some/other")
    listed_a = oai(client, KEY_A).models.list()
    assert [m.id for m in listed_a.data] == [M, "gpt2", f"{M}@ma"]
    assert listed_a.data[2].owned_by == TENANT_A and listed_a.data[2].object == "model"
    assert [m.id for m in oai(client, KEY_B).models.list().data] == [M, "gpt2", "gpt2@mb"]
    raw = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    assert raw["object"] == "list" and set(raw["data"][0]) == {"id", "object", "created", "owned_by"}
    with pytest.raises(openai.AuthenticationError):
        oai(client, "wrong").models.list()


def test_masks_of_others_and_of_other_models(make_client, r):
    client = make_client(api_keys=KEY_A, models=f"{M},gpt2")
    put_mask(r, "theirs", TENANT_B)
    put_mask(r, "g", TENANT_A, model="gpt2")
    before = snapshot(r)
    api = oai(client, KEY_A)
    with pytest.raises(openai.NotFoundError) as hidden:
        api.completions.create(model=f"{M}@theirs", prompt="x")
    with pytest.raises(openai.NotFoundError) as unknown:
        api.completions.create(model=f"{M}@nothing", prompt="x")
    assert hidden.value.body == {"type": "MaskNotFound", "message": "mask 'theirs' not found"}
    assert unknown.value.body == {"type": "MaskNotFound", "message": "mask 'nothing' not found"}
    with pytest.raises(openai.UnprocessableEntityError, match="is for model 'gpt2'"):
        api.chat.completions.create(model=f"{M}@g", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError, match="unknown model 'gpt-9'"):
        api.completions.create(model="gpt-9", prompt="x")
    assert snapshot(r) == before


COMPLETION_REJECTIONS = [
    ({"prompt": "x" * 101}, 400, "PromptTooLong", ["prompt", "101 characters", "100"]),
    ({"prompt": ["x" * 60, "y" * 60]}, 400, "PromptTooLong", ["120 characters"]),
    ({"max_tokens": 65}, 422, "LimitExceeded", ["max_tokens = 65", "64"]),
    ({"prompt": ["a", "b", "c"], "n": 2}, 422, "LimitExceeded", ["6 completions", "4"]),
    ({"stop": ["a", "b", "c", "d", "e"]}, 422, "LimitExceeded", ["stop", "4"]),
    ({"logprobs": 21}, 422, "ValidationError", ["logprobs"]),
    ({"logprobs": 1, "stream": True}, 422, "ValidationError", ["not supported with stream"]),
    ({"echo": True, "stream": True}, 422, "ValidationError", ["not supported with stream"]),
    ({"prompt": [[1, 2], []]}, 422, "ValidationError", ["at least one token"]),
    ({"prompt": [1, -2]}, 422, "ValidationError", ["prompt"]),
    ({"prompt": ["text", [1, 2]]}, 422, "ValidationError", ["prompt"]),
    ({"prompt": list(range(101))}, 400, "PromptTooLong", ["101 characters"]),
    ({"best_of": 3}, 422, "UnsupportedParameter", ["best_of"]),
    ({"presence_penalty": 0.5}, 422, "UnsupportedParameter", ["presence_penalty"]),
    ({"suffix": "end"}, 422, "UnsupportedParameter", ["suffix"]),
    ({"frobnicate": 1}, 422, "ValidationError", ["frobnicate"]),
    ({"model": "nope@"}, 422, "UnknownModel", ["nope@"]),
]
CHAT_REJECTIONS = [
    ({"messages": [{"role": "user", "content": "x" * 101}]}, 400, "PromptTooLong", ["messages", "100"]),
    ({"max_completion_tokens": 65}, 422, "LimitExceeded", ["max_completion_tokens = 65"]),
    ({"max_tokens": 65}, 422, "LimitExceeded", ["max_tokens = 65"]),
    ({"n": 5}, 422, "LimitExceeded", ["5 completions"]),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 422, "UnsupportedParameter", ["tools"]),
    ({"logprobs": True}, 422, "UnsupportedParameter", ["logprobs"]),
    ({"response_format": {"type": "json_object"}}, 422, "UnsupportedParameter", ["response_format"]),
    ({"messages": [{"role": "tool", "content": "x"}]}, 422, "ValidationError", ["role"]),
    ({"messages": []}, 422, "ValidationError", ["messages"]),
]


@pytest.mark.parametrize(
    ("path", "overrides", "status", "type", "fragments"),
    [("/v1/completions", *e) for e in COMPLETION_REJECTIONS]
    + [("/v1/chat/completions", *e) for e in CHAT_REJECTIONS],
    ids=[f"completions-{e[0]}"[:50] for e in COMPLETION_REJECTIONS]
    + [f"chat-{e[0]}"[:50] for e in CHAT_REJECTIONS],
)
def test_rejections_write_nothing(make_client, r, path, overrides, status, type, fragments):
    client = make_client(max_prompt_chars=100, max_new_tokens=64, max_generate_rows=4)
    r.set("sentinel", "1")
    before = snapshot(r)
    base = {"model": M} | (
        {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    )
    assert_error(client.post(path, json=base | overrides), status, type, *fragments)
    assert snapshot(r) == before


def test_default_values_of_unsupported_parameters_are_accepted(client, responder):
    harmless = {
        "logprobs": None,
        "echo": False,
        "best_of": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
    }
    harmless |= {"logit_bias": {}, "user": "u1", "suffix": None}
    assert client.post("/v1/completions", json={"model": M, "prompt": "x"} | harmless).status_code == 200
    chat = {
        "logprobs": False,
        "top_logprobs": 0,
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
    }
    chat |= {"response_format": {"type": "text"}, "store": False, "metadata": {"a": "b"}, "user": "u1"}
    body = {"model": M, "messages": [{"role": "user", "content": "x", "name": "ann", "refusal": None}]}
    assert client.post("/v1/chat/completions", json=body | chat).status_code == 200
