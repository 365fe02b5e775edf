"""POST /v1/unlearn: what a valid request writes, idempotency, and every rejection leaving Redis as it was."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from protocol import PruneJob, keys
from tests.unit.service.helpers import assert_error, snapshot

pytestmark = pytest.mark.redis

BUILTINS = {
    "forget": {"kind": "builtin", "name": "python_code"},
    "retain": {"kind": "builtin", "name": "english_prose"},
}


def body(**overrides: Any) -> dict[str, Any]:
    return BUILTINS | overrides


def test_unlearn_queues_one_job(client, r):
    files = {
        "forget": {"kind": "file", "path": "forget.jsonl"},
        "retain": {"kind": "file", "path": "sub/retain.txt"},
    }
    req = files | {
        "name": "no-python",
        "eval": [{"kind": "inline", "texts": ["x = 1"]}],
        "params": {"steps": 3},
    }
    resp = client.post("/v1/unlearn", json=req)
    assert resp.status_code == 202, resp.text
    accepted = resp.json()
    job_id = accepted["job_id"]
    assert accepted["state"] == "queued" and accepted["kind"] == "prune" and accepted["created"] is True
    assert len(job_id) == 32 and accepted["status_url"] == f"/v1/jobs/{job_id}"

    job = {k.decode(): v.decode() for k, v in r.hgetall(keys.JOB_KEY.format(job_id=job_id)).items()}
    assert job["state"] == "queued" and job["kind"] == "prune" and job["tenant"] == "local"
    payload = PruneJob.model_validate(json.loads(job["payload"]))  # what the worker will re-validate
    assert payload.job_id == job_id and payload.tenant == "local" and payload.params.steps == 3
    assert payload.name == "no-python" and payload.eval is not None
    assert float(job["created_at"]) > 0 and json.loads(job["progress"])["steps"] == 3
    entries = r.xrange(keys.JOB_STREAM)  # a token per queued job; the tenant's queue names the job
    assert [e[1] for e in entries] == [{b"token": b"1"}]
    assert r.lrange(keys.TENANT_QUEUE_KEY.format(tenant="local"), 0, -1) == [job_id.encode()]
    assert r.zrange(keys.TENANT_JOBS_KEY.format(tenant="local"), 0, -1) == [job_id.encode()]
    assert r.zrange(keys.ALL_JOBS_KEY, 0, -1) == [job_id.encode()]

    status = client.get(f"/v1/jobs/{job_id}").json()
    assert status["state"] == "queued" and status["phase"] == "queued" and status["steps"] == 3
    assert status["name"] == "no-python" and status["kind"] == "prune" and status["metrics"] == []
    assert status["mask_id"] is None and status["error"] is None and status["created_at"] > 0


def test_idempotency_key_returns_the_first_job(client, r):
    first = client.post("/v1/unlearn", json=body(idempotency_key="abc"))
    again = client.post("/v1/unlearn", json=body(idempotency_key="abc"))
    other = client.post("/v1/unlearn", json=body(idempotency_key="xyz"))
    assert first.status_code == 202 and again.status_code == 200 and other.status_code == 202
    assert again.json()["job_id"] == first.json()["job_id"] and again.json()["created"] is False
    assert other.json()["job_id"] != first.json()["job_id"]
    assert r.xlen(keys.JOB_STREAM) == 2 and r.zcard(keys.ALL_JOBS_KEY) == 2


@pytest.fixture
def unchanged(r) -> Iterator[None]:
    """Asserts the test wrote nothing to Redis."""
    r.set("sentinel", "1")
    before = snapshot(r)
    yield
    assert snapshot(r) == before


REJECTIONS = [
    # (request overrides, status, error type, message fragments)
    ({"model": "gpt-9"}, 422, "UnknownModel", ["gpt-9", "smollm2-135m-instruct"]),
    (
        {"forget": {"kind": "builtin", "name": "klingon"}},
        422,
        "UnknownDataset",
        ["klingon", "python_code, english_prose, toxic, toxic_prompts"],
    ),
    ({"forget": {"kind": "file", "path": "missing.jsonl"}}, 422, "DatasetNotFound", ["missing.jsonl"]),
    ({"forget": {"kind": "file", "path": "../secret.txt"}}, 422, "PathOutsideDataRoot", ["../secret.txt"]),
    (
        {"forget": {"kind": "file", "path": "sub/../../secret.txt"}},
        422,
        "PathOutsideDataRoot",
        ["secret.txt"],
    ),
    ({"forget": {"kind": "file", "path": "/etc/passwd"}}, 422, "PathOutsideDataRoot", ["/etc/passwd"]),
    (
        {"retain": {"kind": "file", "path": "escape.txt"}},
        422,
        "PathOutsideDataRoot",
        ["escape.txt", "retain"],
    ),
    ({"retain": {"kind": "file", "path": "forget.exe"}}, 422, "InvalidDataset", ["forget.exe"]),
    ({"retain": {"kind": "hub", "id": "json"}}, 422, "InvalidDataset", ["json"]),
    (
        {"retain": {"kind": "file", "path": "forget.jsonl", "filter": "rm -rf"}},
        422,
        "InvalidDataset",
        ["filter"],
    ),
    ({"forget": {"kind": "inline", "texts": []}}, 422, "ValidationError", ["forget.inline.texts"]),
    ({"forget": {"kind": "inline", "texts": ["  ", ""]}}, 422, "EmptyDataset", ["forget"]),
    ({"eval": [{"kind": "builtin", "name": "nope"}]}, 422, "UnknownDataset", ["eval[0]", "nope"]),
    ({"params": {"ff_frac": -0.1}}, 422, "ValidationError", ["params.ff_frac"]),
    ({"params": {"steps": 201}}, 422, "LimitExceeded", ["params.steps", "200"]),
    ({"params": {"collect_tokens": 1_000_001}}, 422, "LimitExceeded", ["params.collect_tokens"]),
    ({"params": {"eval_tokens": 2_000_000}}, 422, "LimitExceeded", ["params.eval_tokens"]),
    ({"params": {"bogus": 1}}, 422, "ValidationError", ["params.bogus"]),
    ({"forget": {"kind": "inline", "texts": ["x"] * 10_001}}, 422, "LimitExceeded", ["10001 texts"]),
    ({"forget": {"kind": "inline", "texts": ["x" * 1_000_000] * 3}}, 422, "LimitExceeded", ["characters"]),
]


@pytest.mark.parametrize(
    ("overrides", "status", "type", "fragments"), REJECTIONS, ids=[e[2] for e in REJECTIONS]
)
@pytest.mark.usefixtures("unchanged")
def test_rejected_requests_store_nothing(client, overrides, status, type, fragments):
    assert_error(client.post("/v1/unlearn", json=body(**overrides)), status, type, *fragments)


@pytest.mark.usefixtures("unchanged")
def test_missing_field_and_bad_json_are_validation_errors(client):
    assert_error(
        client.post("/v1/unlearn", json={"forget": BUILTINS["forget"]}), 422, "ValidationError", "retain"
    )
    bad = client.post("/v1/unlearn", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(bad, 422, "ValidationError")


@pytest.mark.usefixtures("unchanged")
def test_oversized_body_is_413(make_client):
    client = make_client(max_request_bytes=4096)
    big = body(forget={"kind": "inline", "texts": ["y" * 5000]})
    assert_error(client.post("/v1/unlearn", json=big), 413, "PayloadTooLarge", "4096")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed size is what counts
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    assert_error(client.post("/v1/unlearn", content=chunks()), 413, "PayloadTooLarge")


def test_chunked_body_under_the_limit_is_read(make_client):
    client = make_client(max_request_bytes=4096)
    data = json.dumps(body()).encode()
    resp = client.post(
        "/v1/unlearn", content=iter([data[:10], data[10:]]), headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 202, resp.text


def test_allow_any_model(make_client):
    client = make_client(allow_any_model=True)
    assert client.post("/v1/unlearn", json=body(model="org/some-model")).status_code == 202


def test_detox_preset_fills_the_job_and_explicit_fields_win():
    from protocol import PRESETS
    from service.schemas import UnlearnRequest

    req = UnlearnRequest.model_validate({"preset": "detox"})
    preset = PRESETS["detox"]
    assert req.forget.model_dump() == preset["forget"] and req.retain.model_dump() == preset["retain"]
    assert req.params.budget is not None and req.params.budget.max_retain_ppl_increase == 0.1
    mine = UnlearnRequest.model_validate({"preset": "detox", "params": {"steps": 2}, "name": "mine"})
    assert mine.params.steps == 2 and mine.name == "mine"
    assert mine.params.ff_frac == preset["params"]["ff_frac"]  # the rest of the preset's params stay
    with pytest.raises(ValueError, match="preset"):
        UnlearnRequest.model_validate({"preset": "nope"})
