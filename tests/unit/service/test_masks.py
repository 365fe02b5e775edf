"""/v1/masks (on mask hashes written in the worker's layout), export, and POST /v1/evaluate."""

from __future__ import annotations

import json

import pytest

from protocol import EvaluateJob, keys
from tests.unit.service.helpers import assert_error, put_mask, snapshot

pytestmark = pytest.mark.redis


def test_list_get_file(client, r):
    bits = put_mask(r, "m1", "local")
    put_mask(r, "m2", "local")
    put_mask(r, "hidden", "someone-else")
    masks = client.get("/v1/masks").json()["masks"]
    assert [m["mask_id"] for m in masks] == ["m2", "m1"] and masks[0]["model"] == "smollm2-135m-instruct"
    meta = client.get("/v1/masks/m1").json()
    assert (
        meta["fingerprint"] == "fp123"
        and meta["ff_pruned_per_layer"] == [1, 2]
        and meta["job_id"] == "j" * 32
    )
    file = client.get("/v1/masks/m1/file")
    assert file.status_code == 200 and file.content == bits
    assert file.headers["content-type"] == "application/octet-stream"
    assert 'filename="mask-m1.safetensors"' in file.headers["content-disposition"]
    for path in ("/v1/masks/hidden", "/v1/masks/hidden/file", "/v1/masks/nope", "/v1/masks/a:b"):
        assert_error(client.get(path), 404, "MaskNotFound")


def test_delete_keeps_data_while_another_tenant_holds_it(client, r):
    put_mask(r, "shared", "local", "someone-else")
    assert client.delete("/v1/masks/shared").json() == {"mask_id": "shared", "deleted": True}
    assert_error(client.get("/v1/masks/shared"), 404, "MaskNotFound")
    assert r.exists(keys.MASK_KEY.format(mask_id="shared"))
    assert r.smembers(keys.MASK_TENANTS_KEY.format(mask_id="shared")) == {b"someone-else"}
    assert_error(client.delete("/v1/masks/shared"), 404, "MaskNotFound")

    put_mask(r, "mine", "local")
    assert client.delete("/v1/masks/mine").status_code == 200
    assert not r.exists(keys.MASK_KEY.format(mask_id="mine"), keys.MASK_TENANTS_KEY.format(mask_id="mine"))


def test_export_queues_an_export_job(client, r):
    put_mask(r, "m1", "local")
    resp = client.post("/v1/masks/m1/export")
    assert resp.status_code == 202 and resp.json()["kind"] == "export"
    job = r.hgetall(keys.JOB_KEY.format(job_id=resp.json()["job_id"]))
    payload = json.loads(job[b"payload"])
    assert payload == {
        "schema_version": 1,
        "job_kind": "export",
        "job_id": resp.json()["job_id"],
        "tenant": "local",
        "mask_id": "m1",
        "model": "smollm2-135m-instruct",
    }
    assert_error(client.post("/v1/masks/nope/export"), 404, "MaskNotFound")


def test_evaluate_queues_an_evaluate_job(client, r):
    put_mask(r, "m1", "local")
    req = {
        "mask_id": "m1",
        "datasets": [{"kind": "builtin", "name": "toxic_prompts"}],
        "metrics": ["toxicity"],
    }
    resp = client.post("/v1/evaluate", json=req)
    assert resp.status_code == 202, resp.text
    job = r.hgetall(keys.JOB_KEY.format(job_id=resp.json()["job_id"]))
    payload = EvaluateJob.model_validate(json.loads(job[b"payload"]))
    assert payload.mask_id == "m1" and payload.tenant == "local" and payload.metrics == ["toxicity"]
    assert job[b"kind"] == b"evaluate"


@pytest.mark.parametrize(
    ("req", "status", "type", "fragment"),
    [
        ({"mask_id": "hidden"}, 404, "MaskNotFound", "hidden"),
        ({"mask_id": "other-model", "model": "smollm2-135m-instruct"}, 422, "MaskModelMismatch", "gpt2"),
        ({"include_base": False}, 422, "ValidationError", "include_base"),
        ({"datasets": []}, 422, "ValidationError", "datasets"),
        ({"datasets": [{"kind": "file", "path": "../x.txt"}]}, 422, "PathOutsideDataRoot", "datasets[0]"),
        ({"eval_tokens": 10**7}, 422, "LimitExceeded", "eval_tokens"),
        ({"job_id": "mine"}, 422, "ValidationError", "assigned by the gateway"),
        ({"tenant": "k_0000"}, 422, "ValidationError", "assigned by the gateway"),
    ],
)
def test_evaluate_rejections_store_nothing(client, r, req, status, type, fragment):
    put_mask(r, "hidden", "someone-else")
    put_mask(r, "other-model", "local", model="gpt2")
    before = snapshot(r)
    full = {"datasets": [{"kind": "builtin", "name": "english_prose"}]} | req
    assert_error(client.post("/v1/evaluate", json=full), status, type, fragment)
    assert snapshot(r) == before
