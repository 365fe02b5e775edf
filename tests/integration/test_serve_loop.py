"""The serving lane against a real Redis and a tiny model: batching, per-row masks, replies, errors.

Requests are written to the stream as the gateway writes them, and the loop's `turn()` (admit, decode
one step) and `finish()` are called directly, so what shares a batch is decided by the test, not by
timing.
"""

from __future__ import annotations

import copy
import time
import uuid
from pathlib import Path

import pytest
import redis
import torch
from pydantic import TypeAdapter

from protocol import ChatMessage, GenerateEvent, GenerateTask, SamplingParams, keys
from selprune_core.config import SamplingConfig
from selprune_core.generation import generate
from selprune_core.masking import fold_into_weights
from selprune_core.masks import NeuronMask
from selprune_core.sites import model_fingerprint, resolve_sites
from tests.integration.records import store_mask
from worker.runtime import ModelRuntime
from worker.serving import ServeLoop, ensure_serve_group

pytestmark = pytest.mark.redis
EVENTS: TypeAdapter[GenerateEvent] = TypeAdapter(GenerateEvent)
PROMPTS = ["the cat sat on", "def main():", "a quick brown fox", "import os"]
GREEDY = SamplingParams(max_new_tokens=6)


@pytest.fixture
def loop(client: redis.Redis, make_settings, model_dir, tmp_path) -> ServeLoop:
    settings = make_settings(serve_max_batch=8, serve_batch_window_ms=0, max_prompt_tokens=40)
    runtime = ModelRuntime(cache_dir=tmp_path / "cache", data_root=tmp_path, device="cpu", dtype="float32")
    ensure_serve_group(client)
    return ServeLoop(settings, client, runtime)


def _mask(loop: ServeLoop, model_dir: Path, seed: int, frac: float = 0.5) -> NeuronMask:
    loaded = loop.runtime.model(str(model_dir))
    sites = loaded.sites
    g = torch.Generator().manual_seed(seed)
    ff = torch.rand(sites.n_layers, sites.d_mlp, generator=g) > frac
    attn = torch.rand(sites.n_layers, sites.d_attn, generator=g) > frac
    return NeuronMask(loaded.fingerprint, ff, attn, sites.n_heads)


def _store(client: redis.Redis, mask: NeuronMask, tenant: str = "t1") -> str:
    return store_mask(client, mask.to_bytes(), {"model": "tiny"}, tenant)


def _send(client: redis.Redis, model_dir: Path, tenant: str = "t1", deadline_s: float = 60, **fields) -> str:
    task = GenerateTask(
        request_id=uuid.uuid4().hex,
        tenant=tenant,
        model=str(model_dir),
        enqueued_at=time.time(),
        deadline=time.time() + deadline_s,
        **{"sampling": GREEDY, **fields},
    )
    client.xadd(keys.GENERATE_STREAM, {"task": task.model_dump_json()})
    return task.request_id


def _serve(loop: ServeLoop) -> int:
    """One turn (admitting what waits), then decode the batch to its end; returns requests admitted."""
    admitted = loop.turn()
    loop.finish()
    return admitted


def _events(client: redis.Redis, request_id: str) -> list:
    raw = client.lrange(keys.GENERATE_REPLY_KEY.format(request_id=request_id), 0, -1)
    return [EVENTS.validate_json(item) for item in raw]


def _done(client: redis.Redis, request_id: str):
    events = _events(client, request_id)
    assert events and events[-1].kind == "done", events
    return events[-1]


def test_masked_request_matches_the_mask_folded_into_weights(client, loop, model_dir, tokenizer):
    mask = _mask(loop, model_dir, seed=1)
    mask_id = _store(client, mask)
    plain_id = _send(client, model_dir, prompts=PROMPTS[:2])
    masked_id = _send(client, model_dir, prompts=PROMPTS[:2], mask_id=mask_id)
    assert _serve(loop) == 2

    folded = copy.deepcopy(loop.runtime.model(str(model_dir)).model)
    fold_into_weights(folded, resolve_sites(folded), mask, fingerprint=model_fingerprint(folded))
    expected = generate(folded, tokenizer, PROMPTS[:2], SamplingConfig(max_new_tokens=6, temperature=0.0))
    masked = _done(client, masked_id)
    assert [c.text for c in masked.choices] == [g.text for g in expected]
    assert masked.mask_id == mask_id and masked.timings.batch_rows == 4
    assert [c.text for c in _done(client, plain_id).choices] != [g.text for g in expected]


def test_every_row_of_a_mixed_batch_gets_what_it_gets_alone(client, loop, model_dir):
    mask_ids = [_store(client, _mask(loop, model_dir, seed=s)) for s in range(3)]
    cases = [
        {"prompts": [PROMPTS[0]], "mask_id": mask_ids[0]},
        {"prompts": [PROMPTS[1]], "mask_id": mask_ids[1]},
        {"prompts": [PROMPTS[2]], "mask_id": mask_ids[2]},
        {"prompts": [PROMPTS[3]]},
        {
            "prompts": [PROMPTS[0]],
            "mask_id": mask_ids[2],
            "n": 2,
            "sampling": SamplingParams(max_new_tokens=5, temperature=0.9, top_k=8, seed=4),
        },
        {"messages": [ChatMessage(role="user", content="hello there")], "mask_id": mask_ids[1]},
    ]
    together = [_send(client, model_dir, **case) for case in cases]
    assert _serve(loop) == len(cases)
    mixed = [_done(client, rid) for rid in together]
    assert {d.timings.batch_rows for d in mixed} == {7}
    for case, in_batch in zip(cases, mixed, strict=True):
        alone_id = _send(client, model_dir, **case)
        assert _serve(loop) == 1
        alone = _done(client, alone_id)
        assert alone.timings.batch_rows == case.get("n", 1)
        assert [c.text for c in in_batch.choices] == [c.text for c in alone.choices]
        assert in_batch.usage == alone.usage
    sampled = mixed[4].choices
    assert sampled[0].text != sampled[1].text  # n = 2 rows draw from seeds 4 and 5


def test_a_mean_ablation_row_in_a_mixed_batch_matches_it_alone_and_folded(client, loop, model_dir, tokenizer):
    """Offsets ride the table's per-row factors: next to a zero-ablation row and an unmasked one, an
    offset row decodes what it decodes alone and what the mask folded into biases decodes."""
    bits = _mask(loop, model_dir, seed=1)
    g = torch.Generator().manual_seed(1)
    offsets = torch.randn(bits.ff_keep.shape, generator=g), torch.randn(bits.attn_keep.shape, generator=g)
    mean = NeuronMask(bits.fingerprint, bits.ff_keep, bits.attn_keep, bits.n_heads, *offsets)
    mean_case = {"prompts": PROMPTS[:2], "mask_id": _store(client, mean)}
    mixed_id = _send(client, model_dir, **mean_case)
    _send(client, model_dir, prompts=PROMPTS[2:], mask_id=_store(client, _mask(loop, model_dir, seed=2)))
    _send(client, model_dir, prompts=PROMPTS[:1])
    assert _serve(loop) == 3
    alone_id = _send(client, model_dir, **mean_case)
    assert _serve(loop) == 1

    folded = copy.deepcopy(loop.runtime.model(str(model_dir)).model)
    fold_into_weights(folded, resolve_sites(folded), mean, fingerprint=model_fingerprint(folded))
    expected = generate(folded, tokenizer, PROMPTS[:2], SamplingConfig(max_new_tokens=6, temperature=0.0))
    mixed, alone = _done(client, mixed_id), _done(client, alone_id)
    assert mixed.timings.batch_rows == 5 and alone.timings.batch_rows == 2
    assert [c.text for c in mixed.choices] == [c.text for c in alone.choices] == [g.text for g in expected]
    # The same bits zero-ablated decode something else, so the offsets were applied.
    zero_id = _send(client, model_dir, prompts=PROMPTS[:2], mask_id=_store(client, bits))
    assert _serve(loop) == 1
    assert [c.text for c in _done(client, zero_id).choices] != [c.text for c in mixed.choices]


def test_streamed_deltas_add_up_to_the_reply(client, loop, model_dir):
    rid = _send(client, model_dir, prompts=PROMPTS[:2], stream=True)
    quiet = _send(client, model_dir, prompts=PROMPTS[2:3])
    _serve(loop)
    events = _events(client, rid)
    done = events[-1]
    assert done.kind == "done" and all(e.kind == "delta" for e in events[:-1])
    for choice in done.choices:
        assert "".join(e.text for e in events[:-1] if e.index == choice.index) == choice.text
    assert [e.kind for e in _events(client, quiet)] == ["done"]  # no deltas unless asked


def test_bad_requests_are_answered_and_do_not_fail_their_batch(client, loop, model_dir):
    own = _store(client, _mask(loop, model_dir, seed=1), tenant="t1")
    theirs = _store(client, _mask(loop, model_dir, seed=2), tenant="t2")
    good = _send(client, model_dir, prompts=[PROMPTS[0]], mask_id=own)
    unknown = _send(client, model_dir, prompts=[PROMPTS[0]], mask_id="f" * 24)
    foreign = _send(client, model_dir, prompts=[PROMPTS[0]], mask_id=theirs)
    too_long = _send(client, model_dir, prompts=["word " * 100])
    late = _send(client, model_dir, prompts=[PROMPTS[0]], deadline_s=-1)
    _serve(loop)
    assert _done(client, good).choices[0].completion_tokens == 6
    for rid, type_ in ((unknown, "MaskNotFound"), (foreign, "MaskNotFound"), (too_long, "PromptTooLong")):
        (event,) = _events(client, rid)
        assert event.kind == "error" and event.error.type == type_, event
    assert "at most 40" in _events(client, too_long)[0].error.message
    assert _events(client, late) == []  # past its deadline: the gateway has already answered 504
    assert client.ttl(keys.GENERATE_REPLY_KEY.format(request_id=good)) > 0


def test_batch_takes_at_most_max_rows_and_one_model(client, loop, model_dir):
    first = [_send(client, model_dir, prompts=PROMPTS[:3]) for _ in range(3)]  # 9 rows > 8
    assert _serve(loop) == 2
    assert _serve(loop) == 1
    assert [_done(client, rid).timings.batch_rows for rid in first] == [6, 6, 3]
    rows = [int(r) for r in client.lrange(keys.GENERATE_BATCH_ROWS_KEY, 0, -1)]  # one per turn, for /metrics
    assert rows and max(rows) <= 8
    assert all(float(s) > 0 for s in client.lrange(keys.GENERATE_BATCH_SECONDS_KEY, 0, -1))


def test_a_request_joins_the_running_batch_and_leaves_before_it(client, loop, model_dir):
    """Continuous batching: a newcomer does not wait for the running batch to end."""
    long_sampling = SamplingParams(max_new_tokens=20, ignore_eos=True)
    short_sampling = SamplingParams(max_new_tokens=3, ignore_eos=True)
    long_id = _send(client, model_dir, prompts=[PROMPTS[0]], sampling=long_sampling)
    assert loop.turn() == 1 and loop.engine.rows == 1
    loop.turn()  # two tokens into the long request
    short_id = _send(
        client,
        model_dir,
        prompts=[PROMPTS[1]],
        mask_id=_store(client, _mask(loop, model_dir, 3)),
        sampling=short_sampling,
    )
    assert loop.turn() == 1 and loop.engine.rows == 2  # admitted into the running batch
    loop.turn()
    loop.turn()  # the short request's 3 tokens: prefill, then two steps
    short = _done(client, short_id)
    assert short.timings.batch_rows == 2 and _events(client, long_id) == []  # answered mid-flight
    assert loop.engine.rows == 1
    loop.finish()
    assert _done(client, long_id).choices[0].completion_tokens == 20

    # Each got exactly what it gets alone.
    mask_id = short.mask_id
    for rid, fields in (
        (long_id, {"prompts": [PROMPTS[0]], "sampling": long_sampling}),
        (short_id, {"prompts": [PROMPTS[1]], "mask_id": mask_id, "sampling": short_sampling}),
    ):
        alone = _send(client, model_dir, **fields)
        _serve(loop)
        assert _done(client, alone).choices[0].text == _done(client, rid).choices[0].text


def test_requests_for_another_model_wait_their_turn(client, loop, model_dir, tiny_model, tokenizer, tmp_path):
    other_dir = tmp_path / "other"
    tiny_model("gpt2").save_pretrained(other_dir)
    tokenizer.save_pretrained(other_dir)
    first = _send(client, model_dir, prompts=[PROMPTS[0]], sampling=SamplingParams(max_new_tokens=4))
    assert loop.turn() == 1
    other = _send(client, other_dir, prompts=[PROMPTS[1]], sampling=SamplingParams(max_new_tokens=2))
    later = _send(client, model_dir, prompts=[PROMPTS[2]], sampling=SamplingParams(max_new_tokens=2))
    assert loop.turn() == 0  # the other model is next in line: nothing overtakes it
    loop.finish()
    assert _serve(loop) == 1 and loop.engine.model is None  # the other model's request
    assert _serve(loop) == 1
    for rid in (first, other, later):
        assert _done(client, rid).choices
