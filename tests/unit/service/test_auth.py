"""API keys and tenants: 401 without a valid key, and another tenant's ids answer exactly like unknown ones."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from service.auth import is_loopback
from tests.unit.service.helpers import (
    KEY_A,
    KEY_B,
    TENANT_A,
    TENANT_B,
    assert_error,
    auth,
    put_job,
    put_mask,
    snapshot,
)

pytestmark = pytest.mark.redis

UNLEARN = {
    "forget": {"kind": "builtin", "name": "toxic"},
    "retain": {"kind": "builtin", "name": "english_prose"},
}


@pytest.mark.parametrize(
    "headers", [{}, auth("wrong"), {"Authorization": "Basic a2V5LWE="}, {"Authorization": "Bearer"}]
)
def test_missing_or_wrong_key_is_401(authed, r, headers):
    before = snapshot(r)
    for method, path in [("POST", "/v1/unlearn"), ("GET", "/v1/jobs"), ("GET", "/v1/masks")]:
        resp = authed.request(method, path, json=UNLEARN if method == "POST" else None, headers=headers)
        assert_error(resp, 401, "Unauthorized")
        assert resp.headers["www-authenticate"] == "Bearer"
    assert snapshot(r) == before


def test_each_key_sees_only_its_own(authed, r):
    resp = authed.post("/v1/unlearn", json=UNLEARN, headers=auth(KEY_A))
    assert resp.status_code == 202
    job_a = resp.json()["job_id"]
    put_job(r, "jobb", TENANT_B, "succeeded")
    put_mask(r, "maskb", TENANT_B)
    assert authed.get(f"/v1/jobs/{job_a}", headers=auth(KEY_A)).json()["state"] == "queued"
    assert [j["job_id"] for j in authed.get("/v1/jobs", headers=auth(KEY_A)).json()["jobs"]] == [job_a]
    assert authed.get("/v1/masks", headers=auth(KEY_A)).json()["masks"] == []
    assert authed.get("/v1/masks", headers=auth(KEY_B)).json()["masks"][0]["mask_id"] == "maskb"

    before = snapshot(r)
    unknown = authed.get("/v1/jobs/" + "0" * 32, headers=auth(KEY_B)).json()["error"]
    theirs = authed.get(f"/v1/jobs/{job_a}", headers=auth(KEY_B)).json()["error"]
    assert theirs == {"type": unknown["type"], "message": unknown["message"].replace("0" * 32, job_a)}
    assert_error(authed.delete(f"/v1/jobs/{job_a}", headers=auth(KEY_B)), 404, "JobNotFound")
    assert_error(authed.get(f"/v1/jobs/{job_a}/events", headers=auth(KEY_B)), 404, "JobNotFound")
    for method, path in [("GET", ""), ("GET", "/file"), ("DELETE", ""), ("POST", "/export")]:
        assert_error(
            authed.request(method, f"/v1/masks/maskb{path}", headers=auth(KEY_A)), 404, "MaskNotFound"
        )
    evaluate = {"mask_id": "maskb", "datasets": [{"kind": "builtin", "name": "toxic"}]}
    assert_error(authed.post("/v1/evaluate", json=evaluate, headers=auth(KEY_A)), 404, "MaskNotFound")
    assert snapshot(r) == before
    assert TENANT_A.startswith("k_") and len(TENANT_A) == 18 and TENANT_A != TENANT_B


def test_same_idempotency_key_in_two_tenants_makes_two_jobs(authed):
    body = UNLEARN | {"idempotency_key": "same"}
    a = authed.post("/v1/unlearn", json=body, headers=auth(KEY_A)).json()["job_id"]
    b = authed.post("/v1/unlearn", json=body, headers=auth(KEY_B)).json()["job_id"]
    assert a != b


def test_auth_off_is_logged_at_start(make_client, caplog):
    with caplog.at_level(logging.WARNING, logger="service.main"):
        make_client()
    assert "authentication is off" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="service.main"):
        make_client(api_keys=KEY_A)
    assert "authentication is off" not in caplog.text


def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com"]))


def test_server_refuses_public_host_without_keys():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELPRUNE_")}
    env |= {"SELPRUNE_REDIS_URL": "redis://127.0.0.1:1/0", "SELPRUNE_HOST": "0.0.0.0"}
    proc = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "SELPRUNE_API_KEYS" in proc.stderr and "0.0.0.0" in proc.stderr
