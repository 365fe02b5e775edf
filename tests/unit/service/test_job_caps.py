"""Every job's cost is bounded before it is queued, and text that is not valid Unicode is a 4xx.

Each rejection leaves Redis as it was. Bodies are sent as raw JSON (`send`), since a lone surrogate
only exists as the JSON escape "\\ud800" and `Infinity` only as a JSON extension token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from protocol import keys
from tests.unit.service.helpers import assert_error, put_job, put_mask, snapshot

pytestmark = pytest.mark.redis

BUILTINS = {
    "forget": {"kind": "builtin", "name": "python_code"},
    "retain": {"kind": "builtin", "name": "english_prose"},
}
PROSE = {"kind": "builtin", "name": "english_prose"}
SURROGATE = "\ud800"  # what the JSON escape "\ud800" decodes to: a str with no UTF-8 form


def send(client: Any, path: str, body: dict[str, Any] | str) -> Any:
    raw = body if isinstance(body, str) else json.dumps(body)  # ensure_ascii: surrogates travel escaped
    return client.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})


def unlearn(**overrides: Any) -> dict[str, Any]:
    return BUILTINS | overrides


def evaluate(**overrides: Any) -> dict[str, Any]:
    return {"datasets": [PROSE]} | overrides


@pytest.fixture
def unchanged(r) -> Iterator[None]:
    """Asserts the test wrote nothing to Redis."""
    r.set("sentinel", "1")
    put_mask(r, "m1", "local")
    put_job(r, "j1", "local", "succeeded")
    before = snapshot(r)
    yield
    assert snapshot(r) == before


UNLEARN_REJECTIONS = [
    # (id, body, error type, message fragments)
    (
        "tokens-per-pass",
        unlearn(params={"batch_size": 256, "token_limit": 8192}),
        ["batch_size", "token_limit"],
    ),
    ("tokens-per-pass-small", unlearn(params={"batch_size": 65, "token_limit": 512}), ["32768"]),
    ("huge-seed", unlearn(params={"seed": 10**100}), ["params.seed"]),
    ("seed-2**32", unlearn(params={"seed": 2**32}), ["params.seed"]),
    ("negative-seed", unlearn(params={"seed": -1}), ["params.seed"]),
    ("eval-sets", unlearn(eval=[PROSE] * 17), ["eval", "16"]),
    ("skip-first", unlearn(params={"token_limit": 8, "skip_first": 8}), ["skip_first", "token_limit"]),
    (
        "budget-trials",
        unlearn(params={"budget": {"max_retain_drop": 0.1, "shrink": 0.999, "min_frac_ratio": 0.001}}),
        ["min_frac_ratio", "shrink"],
    ),
    ("surrogate-name", unlearn(name=f"a{SURROGATE}"), ["name", "U+D800"]),
    (
        "surrogate-text",
        unlearn(forget={"kind": "inline", "texts": ["ok", f"x{SURROGATE}y"]}),
        ["forget.texts[1]", "U+D800"],
    ),
    ("surrogate-model", unlearn(model=SURROGATE), ["model"]),
    ("surrogate-key", unlearn(params={SURROGATE: 1}), ["field name"]),
    (
        "surrogate-filter",
        unlearn(retain={"kind": "hub", "id": "a/b", "filter": f"x > {SURROGATE}"}),
        ["filter"],
    ),
]


@pytest.mark.parametrize(
    ("body", "fragments"), [c[1:] for c in UNLEARN_REJECTIONS], ids=[c[0] for c in UNLEARN_REJECTIONS]
)
@pytest.mark.usefixtures("unchanged")
def test_unlearn_over_a_cap_or_with_bad_text_is_422(client, body, fragments):
    assert_error(send(client, "/v1/unlearn", body), 422, "ValidationError", *fragments)


@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e999", "1e308"])
@pytest.mark.usefixtures("unchanged")
def test_eps_that_is_not_finite_in_float32_is_422(client, number):
    raw = json.dumps(unlearn(params={"ff_eps": 0.5}))
    resp = send(client, "/v1/unlearn", raw.replace("0.5", number))
    assert_error(resp, 422, "ValidationError", "params.ff_eps")


@pytest.mark.usefixtures("unchanged")
def test_the_contract_caps_token_budgets_even_where_the_settings_allow_more(make_client):
    client = make_client(max_collect_tokens=10**9, max_eval_tokens=10**9)
    for field in ("collect_tokens", "eval_tokens"):
        resp = send(client, "/v1/unlearn", unlearn(params={field: 10_000_001}))
        assert_error(resp, 422, "ValidationError", f"params.{field}")
    assert_error(
        send(client, "/v1/evaluate", evaluate(eval_tokens=10_000_001)), 422, "ValidationError", "eval_tokens"
    )


def test_jobs_at_the_caps_are_accepted(client):
    at_cap = {"batch_size": 64, "token_limit": 512, "seed": 2**32 - 1}
    assert send(client, "/v1/unlearn", unlearn(params=at_cap, eval=[PROSE] * 16)).status_code == 202
    toxicity = {"toxicity_samples_per_prompt": 2, "toxicity_max_new_tokens": 512, "toxicity_max_prompts": 256}
    body = evaluate(datasets=[PROSE] * 16, token_limit=4096, metrics=["toxicity"], seed=2**32 - 1, **toxicity)
    assert send(client, "/v1/evaluate", body).status_code == 202
    attacks = {"relearn_steps": 128, "relearn_texts": 1024, "membership_texts": 1024}
    body = evaluate(metrics=["membership", "relearn"], token_limit=512, **attacks)
    assert send(client, "/v1/evaluate", body).status_code == 202


EVALUATE_REJECTIONS = [
    ("many-datasets", evaluate(datasets=[PROSE] * 5000), ["datasets", "16"]),
    ("17-datasets", evaluate(datasets=[PROSE] * 17), ["datasets"]),
    ("tokens-per-pass", evaluate(token_limit=8192), ["token_limit", "32768"]),
    (
        "toxicity-per-prompt",
        evaluate(metrics=["toxicity"], toxicity_samples_per_prompt=16, toxicity_max_new_tokens=512),
        ["toxicity_samples_per_prompt", "toxicity_max_new_tokens", "1024"],
    ),
    (
        "toxicity-total",
        evaluate(toxicity_max_prompts=1024, toxicity_samples_per_prompt=1, toxicity_max_new_tokens=512),
        ["toxicity_max_prompts", "262144"],
    ),
    ("toxicity-prompts", evaluate(toxicity_max_prompts=1025), ["toxicity_max_prompts"]),
    (
        "relearn-tokens",
        evaluate(metrics=["relearn"], relearn_steps=200, token_limit=512),
        ["relearn_steps", "token_limit", "262144"],
    ),
    ("relearn-steps", evaluate(relearn_steps=201), ["relearn_steps"]),
    ("relearn-lr", evaluate(relearn_learning_rate=0), ["relearn_learning_rate"]),
    ("membership-texts", evaluate(membership_texts=1025), ["membership_texts"]),
    ("unknown-metric", evaluate(metrics=["forgetting"]), ["metrics", "relearn"]),
    ("huge-seed", evaluate(seed=10**100), ["seed"]),
    ("surrogate-mask-id", evaluate(mask_id=SURROGATE), ["mask_id", "U+D800"]),
    (
        "surrogate-text",
        evaluate(datasets=[{"kind": "inline", "texts": [SURROGATE]}]),
        ["datasets[0].texts[0]"],
    ),
    (
        "surrogate-path",
        evaluate(datasets=[{"kind": "file", "path": f"{SURROGATE}.txt"}]),
        ["datasets[0].path"],
    ),
    ("surrogate-key", {**evaluate(), SURROGATE: 1}, ["field name"]),
    ("surrogate-idempotency-key", evaluate(idempotency_key=SURROGATE), ["idempotency_key"]),
]


@pytest.mark.parametrize(
    ("body", "fragments"), [c[1:] for c in EVALUATE_REJECTIONS], ids=[c[0] for c in EVALUATE_REJECTIONS]
)
@pytest.mark.usefixtures("unchanged")
def test_evaluate_over_a_cap_or_with_bad_text_is_422(client, body, fragments):
    assert_error(send(client, "/v1/evaluate", body), 422, "ValidationError", *fragments)


@pytest.mark.usefixtures("unchanged")
def test_evaluate_with_a_mask_id_not_shaped_like_one_is_404(client):
    for mask_id in ("a/b", "m1:bits", "x" * 129, "é"):
        assert_error(send(client, "/v1/evaluate", evaluate(mask_id=mask_id)), 404, "MaskNotFound")


@pytest.mark.usefixtures("unchanged")
def test_ids_in_paths_that_are_not_unicode_text_are_404(client):
    assert_error(client.get("/v1/jobs/%ED%A0%80"), 404, "JobNotFound")
    assert_error(client.get("/v1/masks/%ED%A0%80"), 404, "MaskNotFound")
    assert_error(client.post("/v1/masks/%ED%A0%80/export"), 404, "MaskNotFound")


@pytest.mark.parametrize(
    "last_event_id",
    [
        "99999999999999999999-0",
        "0-99999999999999999999",
        "18446744073709551616",
        "18446744073709551616-0",
        "1-",
    ],
)
@pytest.mark.usefixtures("unchanged")
def test_last_event_id_beyond_a_stream_id_is_422(client, last_event_id):
    resp = client.get("/v1/jobs/j1/events", headers={"Last-Event-ID": last_event_id})
    assert_error(resp, 422, "ValidationError", "Last-Event-ID", "2**64")


def test_the_largest_stream_id_is_read_to_the_end(client, r):
    put_job(r, "j1", "local", "succeeded")
    r.xadd(keys.JOB_EVENTS_KEY.format(job_id="j1"), {"event": "state", "data": '{"state": "running"}'})
    largest = f"{2**64 - 1}-{2**64 - 1}"
    resp = client.get("/v1/jobs/j1/events", headers={"Last-Event-ID": largest})
    assert resp.status_code == 200, resp.text
    assert "event: state" in resp.text and '"succeeded"' in resp.text  # the hash's final state, then the end
