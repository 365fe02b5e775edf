"""Masked serving end to end: the official `openai` client and /v1/generate -> the real gateway ->
Redis -> the real ServeLoop (in a thread) on a tiny llama saved to a folder -> back.

Only the model is small; the gateway, the serving loop, the mask store and the wire are what
production runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis
import torch
from fastapi.testclient import TestClient

from selprune_core.masks import NeuronMask
from service.main import create_app
from service.settings import GatewaySettings
from tests.integration import records
from tests.integration.servers import serving_thread
from tests.unit.service.helpers import KEY_A, KEY_B, TENANT_A, TENANT_B, assert_error, auth
from worker.runtime import ModelRuntime
from worker.serving import ServeLoop

pytestmark = pytest.mark.redis
MAX_PROMPT_CHARS = 500
MAX_PROMPT_TOKENS = 40  # the worker's cap, far below what MAX_PROMPT_CHARS lets through


@pytest.fixture
def server(redis_url, make_settings, model_dir, tmp_path) -> Iterator[ServeLoop]:
    settings = make_settings(max_prompt_tokens=MAX_PROMPT_TOKENS, serve_batch_window_ms=5, poll_block_ms=50)
    runtime = ModelRuntime(cache_dir=tmp_path / "cache", data_root=tmp_path, device="cpu", dtype="float32")
    runtime.model(str(model_dir))  # load before the first request, so no request waits on it
    with serving_thread(settings, redis_url, runtime) as loop:
        yield loop


@pytest.fixture
def gateway(redis_url, model_dir, tmp_path, server) -> Iterator[TestClient]:
    settings = GatewaySettings(
        redis_url=redis_url,
        data_root=tmp_path,
        models=[str(model_dir)],
        api_keys=f"{KEY_A},{KEY_B}",
        max_prompt_chars=MAX_PROMPT_CHARS,
        sse_block_ms=200,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def oai(gateway: TestClient, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=gateway, max_retries=0)


def random_mask(server: ServeLoop, model_dir: Path, frac: float = 0.9) -> NeuronMask:
    """A random mask pruning about `frac` of every layer's neurons."""
    loaded = server.runtime.model(str(model_dir))
    sites, g = loaded.sites, torch.Generator().manual_seed(0)
    ff = torch.rand(sites.n_layers, sites.d_mlp, generator=g) > frac
    attn = torch.rand(sites.n_layers, sites.d_attn, generator=g) > frac
    return NeuronMask(loaded.fingerprint, ff, attn, sites.n_heads)


def store_mask(
    client: redis.Redis, server: ServeLoop, model_dir: Path, tenant: str, frac: float = 0.9
) -> str:
    """A random mask pruning about `frac` of every layer's neurons, stored for `tenant`."""
    mask = random_mask(server, model_dir, frac)
    return records.store_mask(client, mask.to_bytes(), {"model": str(model_dir), "name": "pruned"}, tenant)


def test_openai_client_round_trips_completions_and_chat(gateway, model_dir):
    api, model = oai(gateway), str(model_dir)
    whole = api.completions.create(model=model, prompt="the cat sat on", max_tokens=6, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "text_completion" and choice.finish_reason in ("stop", "length")
    assert 0 < whole.usage.completion_tokens <= 6 and whole.usage.prompt_tokens > 0
    streamed = api.completions.create(
        model=model, prompt="the cat sat on", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text  # greedy: same text

    messages = [{"role": "user", "content": "hello there"}]
    chat = api.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, n=2)
    assert chat.object == "chat.completion" and [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy rows agree
    chunks = list(
        api.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content


def test_a_fixed_seed_reproduces_sampled_text(gateway, model_dir):
    api, model = oai(gateway), str(model_dir)

    def sample(seed: int | None) -> str:
        resp = api.completions.create(
            model=model, prompt="a quick", max_tokens=12, temperature=1.0, seed=seed
        )
        return resp.choices[0].text

    assert sample(5) == sample(5)
    assert len({sample(5), sample(6), sample(7)}) > 1
    # /v1/generate draws a seed when given none and says which: sending it back reproduces the text.
    body = {"model": model, "prompt": "a quick", "temperature": 1.0, "max_new_tokens": 12}
    first = gateway.post("/v1/generate", json=body, headers=auth(KEY_A))
    assert first.status_code == 200, first.text
    again = gateway.post("/v1/generate", json=body | {"seed": first.json()["seed"]}, headers=auth(KEY_A))
    assert again.json()["text"] == first.json()["text"]


def test_generate_through_a_stored_mask(gateway, client, server, model_dir):
    mask_id = store_mask(client, server, model_dir, TENANT_A)
    body = {"prompt": "the cat sat on", "max_new_tokens": 8}
    plain = gateway.post("/v1/generate", json=body | {"model": str(model_dir)}, headers=auth(KEY_A)).json()
    masked = gateway.post("/v1/generate", json=body | {"mask_id": mask_id}, headers=auth(KEY_A)).json()
    assert masked["mask_id"] == mask_id and masked["model"] == str(model_dir) and plain["mask_id"] is None
    assert masked["text"] != plain["text"]
    assert masked["timings"]["batch_rows"] >= 1 and masked["usage"]["completion_tokens"] > 0

    with gateway.stream(
        "POST", "/v1/generate", json=body | {"mask_id": mask_id, "stream": True}, headers=auth(KEY_A)
    ) as resp:
        text = resp.read().decode()
    assert resp.status_code == 200 and "event: delta" in text and "event: done" in text
    assert f'"mask_id":"{mask_id}"' in text.split("event: done")[1]

    name = f"{model_dir}@{mask_id}"
    assert name in [m.id for m in oai(gateway).models.list().data]
    assert name not in [m.id for m in oai(gateway, KEY_B).models.list().data]
    via_openai = oai(gateway).completions.create(
        model=name, prompt="the cat sat on", max_tokens=8, temperature=0
    )
    assert via_openai.choices[0].text == masked["text"]


def test_clear_4xx_through_the_openai_client(gateway, client, server, model_dir):
    api, model = oai(gateway), str(model_dir)
    theirs = store_mask(client, server, model_dir, TENANT_B)
    with pytest.raises(openai.NotFoundError) as unknown:
        api.completions.create(model=f"{model}@{'0' * len(theirs)}", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as hidden:
        api.completions.create(model=f"{model}@{theirs}", prompt="x", max_tokens=2)
    assert unknown.value.body["type"] == hidden.value.body["type"] == "MaskNotFound"
    assert hidden.value.body["message"] == unknown.value.body["message"].replace("0" * len(theirs), theirs)

    with pytest.raises(openai.BadRequestError) as too_many_chars:  # the gateway's cap
        api.completions.create(model=model, prompt="a" * (MAX_PROMPT_CHARS + 1), max_tokens=2)
    assert too_many_chars.value.body["type"] == "PromptTooLong"
    assert str(MAX_PROMPT_CHARS) in too_many_chars.value.body["message"]

    long_prompt = "xq zv " * 60  # under the character cap, far over the worker's token cap
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as too_many_tokens:  # the worker's cap
            api.chat.completions.create(
                model=model, messages=[{"role": "user", "content": long_prompt}], max_tokens=2, stream=stream
            )
        assert too_many_tokens.value.body["type"] == "PromptTooLong"
        assert str(MAX_PROMPT_TOKENS) in too_many_tokens.value.body["message"]

    with pytest.raises(openai.UnprocessableEntityError, match="unknown model"):
        api.completions.create(model="gpt-9", prompt="x")
    assert_error(gateway.post("/v1/generate", json={"prompt": "x"}), 401, "Unauthorized")


def test_demo_shows_the_same_prompt_before_and_through_the_mask(gateway, client, server, model_dir):
    from selprune.client import SelpruneClient
    from selprune.generate_command import before_after
    from tests.unit.service.test_generate import ViaTestClient

    mask_id = store_mask(client, server, model_dir, TENANT_A)
    with SelpruneClient("http://testserver", KEY_A, transport=ViaTestClient(gateway)) as sp:
        lines = before_after(sp, mask_id, prompt="def main():", tokens=6).splitlines()
    base, masked = (line.split(":", 1)[1].strip() for line in lines[1:])
    assert lines[0].startswith("prompt: 'def main():'") and base != masked


def test_logprobs_and_echo_through_a_mask_equal_the_hooked_model(gateway, client, server, model_dir):
    """lm-eval's log-likelihood request (token ids, echo, logprobs 1, max_tokens 1) through a mask
    answers the log-softmax of the hooked model's logits at every prompt token."""
    from selprune_core.masking import apply_mask

    mask = random_mask(server, model_dir, frac=0.3)
    mask_id = store_mask(client, server, model_dir, TENANT_A, frac=0.3)
    loaded = server.runtime.model(str(model_dir))
    ids = loaded.tokenizer("the cat sat on the mat")["input_ids"]
    body = {"prompt": [ids, ids[:4]], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    resp = oai(gateway).completions.create(model=f"{model_dir}@{mask_id}", **body)
    first = resp.choices[0]
    assert first.text.startswith(loaded.tokenizer.decode(ids)) and len(resp.choices) == 2
    lp = first.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(ids) + 1  # the prompt, then one new token
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad(), apply_mask(loaded.model, loaded.sites, mask):
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0]  # [pos, vocab]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for pos in range(1, len(ids)):
        assert lp.token_logprobs[pos] == pytest.approx(expected[pos - 1, ids[pos]].item(), abs=1e-4)
        (best,) = lp.top_logprobs[pos].values()
        assert best == pytest.approx(expected[pos - 1].max().item(), abs=1e-4)
    # the one generated token is the greedy choice after the whole prompt
    assert lp.token_logprobs[-1] == pytest.approx(expected[-1].max().item(), abs=1e-4)
    assert resp.choices[1].logprobs.token_logprobs[1:4] == pytest.approx(lp.token_logprobs[1:4], abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    plain = oai(gateway).completions.create(model=str(model_dir), **body)
    assert plain.choices[0].logprobs.token_logprobs[1:] != pytest.approx(lp.token_logprobs[1:], abs=1e-4)


def test_prompt_token_ids_outside_the_vocabulary_are_a_clear_422(gateway, model_dir):
    api = oai(gateway)
    with pytest.raises(openai.UnprocessableEntityError, match="outside the vocabulary"):
        api.completions.create(model=str(model_dir), prompt=[1, 2, 10**6], max_tokens=2)
