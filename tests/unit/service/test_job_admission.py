"""Job admission at the gateway: a per-tenant cap on unfinished jobs (429 with Retry-After), idempotency
keys bound to their request (409 on reuse), and job listings trimmed by age."""

from __future__ import annotations

import time

from protocol import keys
from tests.unit.service.helpers import KEY_A, KEY_B, TENANT_A, assert_error, auth

BODY = {
    "forget": {"kind": "builtin", "name": "python_code"},
    "retain": {"kind": "builtin", "name": "english_prose"},
}


def test_a_tenant_at_its_cap_gets_429_and_others_do_not(make_client, r):
    client = make_client(api_keys=f"{KEY_A},{KEY_B}", max_active_jobs_per_tenant=2, jobs_retry_after_s=7)
    first = client.post("/v1/unlearn", json=BODY, headers=auth(KEY_A))
    assert client.post("/v1/unlearn", json=BODY, headers=auth(KEY_A)).status_code == 202
    refused = client.post("/v1/unlearn", json=BODY, headers=auth(KEY_A))
    assert_error(refused, 429, "TooManyJobs", "2 unfinished jobs")
    assert refused.headers["retry-after"] == "7"
    assert r.llen(keys.TENANT_QUEUE_KEY.format(tenant=TENANT_A)) == 2 and r.xlen(keys.JOB_STREAM) == 2
    assert client.post("/v1/unlearn", json=BODY, headers=auth(KEY_B)).status_code == 202

    # Cancelling a queued job frees its place at once, before any worker has seen it.
    job_id = first.json()["job_id"]
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth(KEY_A)).status_code == 200
    assert r.lrange(keys.TENANT_QUEUE_KEY.format(tenant=TENANT_A), 0, -1).count(job_id.encode()) == 0
    assert client.post("/v1/unlearn", json=BODY, headers=auth(KEY_A)).status_code == 202


def test_an_idempotency_key_reused_for_another_request_is_409(client, r):
    first = client.post("/v1/unlearn", json=BODY | {"idempotency_key": "k"})
    assert first.status_code == 202
    other = client.post("/v1/unlearn", json=BODY | {"idempotency_key": "k", "name": "different"})
    assert_error(other, 409, "IdempotencyKeyReused", "'k'", first.json()["job_id"])
    evaluate = client.post(
        "/v1/evaluate", json={"datasets": [BODY["forget"]], "idempotency_key": "k"}
    )  # the same key on another route is another request too
    assert_error(evaluate, 409, "IdempotencyKeyReused")
    assert r.xlen(keys.JOB_STREAM) == 1


def test_listings_drop_jobs_older_than_the_history(make_client, r):
    client = make_client(job_history_s=60)
    old_id = "0" * 32
    r.zadd(keys.TENANT_JOBS_KEY.format(tenant="local"), {old_id: time.time() - 3600})
    r.zadd(keys.ALL_JOBS_KEY, {old_id: time.time() - 3600})
    new_id = client.post("/v1/unlearn", json=BODY).json()["job_id"]
    assert r.zrange(keys.TENANT_JOBS_KEY.format(tenant="local"), 0, -1) == [new_id.encode()]
    assert r.zrange(keys.ALL_JOBS_KEY, 0, -1) == [new_id.encode()]
