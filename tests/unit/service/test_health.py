"""Probes, /metrics, the error shape of framework errors, and the OpenAPI document."""

from __future__ import annotations

import json
import time

import pytest

from protocol import keys
from tests.unit.service.helpers import assert_error, put_job

pytestmark = pytest.mark.redis


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_needs_a_worker_heartbeat(client, r):
    assert_error(client.get("/readyz"), 503, "NotReady", "worker")
    r.set(keys.WORKER_HEARTBEAT_KEY.format(worker_id="w1"), "1", ex=30)
    assert client.get("/readyz").json() == {"status": "ready", "redis": True, "workers": 1, "servers": 0}


def test_a_serving_only_worker_is_ready_too(client, r):
    beat = json.dumps({"worker_id": "s1", "models": [], "at": time.time()})
    r.set(keys.SERVER_HEARTBEAT_KEY.format(worker_id="s1"), beat, ex=30)
    assert client.get("/readyz").json() == {"status": "ready", "redis": True, "workers": 0, "servers": 1}


def test_readyz_and_routes_without_redis(make_client):
    client = make_client(redis_url="redis://127.0.0.1:1/0")
    assert_error(client.get("/readyz"), 503, "NotReady", "PING")
    assert_error(client.get("/v1/jobs"), 503, "QueueUnavailable")
    assert client.get("/healthz").status_code == 200


def test_metrics_text(client, r):
    client.post(
        "/v1/unlearn",
        json={"forget": {"kind": "builtin", "name": "toxic"}, "retain": {"kind": "builtin", "name": "toxic"}},
    )
    put_job(r, "done", "local", "succeeded")
    r.rpush(keys.JOB_DURATIONS_KEY, "10", "20", "30")
    r.rpush(keys.GENERATE_BATCH_ROWS_KEY, "8", "2")
    r.xadd(keys.GENERATE_STREAM, {"task": "{}"})
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = resp.text
    for line in [
        "# TYPE selprune_queue_depth gauge",
        "selprune_queue_depth 1",
        'selprune_jobs{state="queued"} 1',
        'selprune_jobs{state="succeeded"} 1',
        "selprune_workers 0",
        "# TYPE selprune_job_duration_seconds summary",
        'selprune_job_duration_seconds{quantile="0.5"} 20',
        "selprune_job_duration_seconds_sum 60",
        "selprune_job_duration_seconds_count 3",
        'selprune_step_duration_seconds{quantile="0.9"} NaN',
        "selprune_step_duration_seconds_count 0",
        "selprune_generate_waiting 1",
        "selprune_servers 0",
        "selprune_generate_batch_rows_sum 10",
        "selprune_generate_batch_seconds_count 0",
    ]:
        assert line in text.splitlines(), line


def test_queue_depth_counts_undelivered_and_pending(client, r):
    r.xgroup_create(keys.JOB_STREAM, keys.JOB_GROUP, id="0", mkstream=True)
    for _ in range(3):
        client.post(
            "/v1/unlearn",
            json={
                "forget": {"kind": "builtin", "name": "toxic"},
                "retain": {"kind": "builtin", "name": "toxic"},
            },
        )
    r.xreadgroup(keys.JOB_GROUP, "worker-1", {keys.JOB_STREAM: ">"}, count=1)
    lines = client.get("/metrics").text.splitlines()
    assert "selprune_queue_depth 2" in lines and "selprune_queue_pending 1" in lines


def test_framework_errors_use_the_error_shape(client):
    assert_error(client.get("/v1/nothing-here"), 404, "NotFound")
    assert_error(client.put("/v1/unlearn", json={}), 405, "MethodNotAllowed")


def test_openapi_documents_every_route(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {
        "/v1/unlearn",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/events",
        "/v1/evaluate",
    } <= set(paths)
    assert {
        "/v1/masks",
        "/v1/masks/{mask_id}",
        "/v1/masks/{mask_id}/file",
        "/v1/masks/{mask_id}/export",
    } <= set(paths)
    for path, ops in paths.items():
        for method, op in ops.items():
            assert op.get("description") and op.get("tags"), (method, path)
            if "422" in op["responses"]:
                schema = op["responses"]["422"]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
