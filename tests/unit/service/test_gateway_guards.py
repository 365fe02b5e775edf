"""The gateway's guards outside the routes: the Host header check of a keyless gateway (DNS rebinding),
the optional /metrics key, and hub datasets refused up front by SELPRUNE_HUB_DATASETS. Every refusal
leaves Redis as it was."""

from __future__ import annotations

from typing import Any

import pytest

from service.auth import allowed_hosts, host_allowed, host_name
from service.settings import GatewaySettings
from tests.unit.service.helpers import KEY_A, assert_error, auth, snapshot

pytestmark = pytest.mark.redis

BUILTINS = {
    "forget": {"kind": "builtin", "name": "python_code"},
    "retain": {"kind": "builtin", "name": "english_prose"},
}
HUB = {"kind": "hub", "id": "org/corpus", "split": "train"}


def unlearn(**overrides: Any) -> dict[str, Any]:
    return BUILTINS | overrides


# Host header ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "attacker.test:8000", "127.0.0.1.evil.example", ""])
def test_keyless_gateway_refuses_a_foreign_host_header(make_client, r, host):
    client = make_client(allowed_hosts="")  # only the defaults: loopback names and the bind host
    before = snapshot(r)
    for method, path in [("POST", "/v1/unlearn"), ("GET", "/v1/jobs"), ("GET", "/healthz")]:
        resp = client.request(
            method, path, json=BUILTINS if method == "POST" else None, headers={"Host": host}
        )
        assert_error(resp, 400, "InvalidHost", "Host header", "SELPRUNE_ALLOWED_HOSTS")
    assert snapshot(r) == before


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"])
def test_keyless_gateway_answers_loopback_names(make_client, host):
    client = make_client(allowed_hosts="")
    assert client.get("/healthz", headers={"Host": host}).status_code == 200


def test_allowed_hosts_add_names_and_keys_lift_the_default_check(make_client):
    keyless = make_client(allowed_hosts="box.internal, *.example.org")
    for host in ("box.internal:8000", "api.example.org"):
        assert keyless.get("/healthz", headers={"Host": host}).status_code == 200
    assert_error(keyless.get("/healthz", headers={"Host": "example.org.evil"}), 400, "InvalidHost")
    keyed = make_client(api_keys=KEY_A, allowed_hosts="")
    assert keyed.get("/healthz", headers={"Host": "gateway.example.com"}).status_code == 200
    keyed_listed = make_client(api_keys=KEY_A, allowed_hosts="gateway.example.com")
    assert_error(keyed_listed.get("/healthz", headers={"Host": "other.example.com"}), 400, "InvalidHost")


def test_host_names_and_matching(redis_url):
    assert host_name("Example.COM:8000") == "example.com" and host_name("[::1]:80") == "::1"
    assert host_name("::1") == "::1" and host_name("[broken") == ""
    allowed = frozenset({"localhost", "*.example.org"})
    assert host_allowed("a.b.example.org", allowed) and not host_allowed("example.org", allowed)
    assert not host_allowed("", allowed)
    settings = GatewaySettings(redis_url=redis_url, host="0.0.0.0")  # type: ignore[arg-type]
    assert allowed_hosts(settings) == frozenset({"localhost", "127.0.0.1", "::1"})


# /metrics -------------------------------------------------------------------------------------------
def test_metrics_requires_the_metrics_key_when_one_is_set(make_client):
    client = make_client(metrics_key="scrape-secret")
    for headers in ({}, auth("wrong"), auth(KEY_A), {"Authorization": "Basic c2NyYXBlLXNlY3JldA=="}):
        resp = client.get("/metrics", headers=headers)
        assert_error(resp, 401, "Unauthorized", "metrics key")
        assert resp.headers["www-authenticate"] == "Bearer"
    resp = client.get("/metrics", headers=auth("scrape-secret"))
    assert resp.status_code == 200 and "selprune_queue_depth" in resp.text
    assert client.get("/healthz").status_code == 200  # the probes stay open


def test_metrics_is_open_without_a_metrics_key(client):
    assert client.get("/metrics").status_code == 200


# Hub datasets ----------------------------------------------------------------------------------------
def test_hub_datasets_are_off_by_default(client, r):
    before = snapshot(r)
    resp = client.post("/v1/unlearn", json=unlearn(retain=HUB))
    assert_error(resp, 422, "HubDatasetNotAllowed", "retain", "org/corpus", "SELPRUNE_HUB_DATASETS=off")
    evaluate = {"datasets": [{"kind": "builtin", "name": "toxic"}, HUB], "mask_id": "m1"}
    assert_error(client.post("/v1/evaluate", json=evaluate), 422, "HubDatasetNotAllowed", "datasets[1]")
    assert snapshot(r) == before


def test_hub_allowlist(make_client, r):
    client = make_client(hub_datasets="org/corpus, other/one")
    assert client.post("/v1/unlearn", json=unlearn(retain=HUB)).status_code == 202
    before = snapshot(r)
    refused = unlearn(eval=[{"kind": "hub", "id": "org/Corpus"}])  # ids compare exactly
    assert_error(
        client.post("/v1/unlearn", json=refused),
        422,
        "HubDatasetNotAllowed",
        "eval[0]",
        "org/corpus,other/one",
    )
    assert snapshot(r) == before


def test_hub_any(make_client):
    client = make_client(hub_datasets="any")
    assert client.post("/v1/unlearn", json=unlearn(forget=HUB)).status_code == 202


def test_malformed_hub_references_are_left_to_the_route(client):
    assert_error(
        client.post("/v1/unlearn", json=unlearn(retain={"kind": "hub", "id": "json"})), 422, "InvalidDataset"
    )


def test_the_allowlist_is_told_only_to_callers_with_a_key(make_client):
    client = make_client(api_keys=KEY_A, hub_datasets="org/secret-set")
    resp = client.post("/v1/unlearn", json=unlearn(retain={"kind": "hub", "id": "x/y"}))
    body = assert_error(resp, 401, "Unauthorized")
    assert "secret-set" not in body["message"]


def test_bad_hub_datasets_setting_fails_at_start(redis_url):
    with pytest.raises(ValueError, match="hub_datasets"):
        GatewaySettings(redis_url=redis_url, hub_datasets="org/ok, ../etc")  # type: ignore[arg-type]
