"""POST /v1/classify against a stand-in serving worker (tests/unit/service/responder.py): what is queued
and answered, worker errors as statuses, and every rejection before queueing leaving Redis unchanged."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from protocol import VIT_DIGITS_MODEL, ErrorInfo, GenerateFailed, keys
from protocol.constants import MLM_CODE_PROSE_MODEL
from tests.unit.service.helpers import (
    KEY_A,
    KEY_B,
    TENANT_A,
    TENANT_B,
    assert_error,
    auth,
    put_mask,
    snapshot,
)
from tests.unit.service.responder import Responder

pytestmark = pytest.mark.redis


def png(size: int = 8) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(size * size, dtype=np.uint8).reshape(size, size)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def npy(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def responder(redis_url):
    with Responder(redis_url) as r:
        yield r


def test_classify_queues_a_task_and_answers(client, r, responder):
    put_mask(r, "m1", "local", model=VIT_DIGITS_MODEL)
    images = [png(), "data:image/png;base64," + png(), npy(np.zeros((8, 8), np.float32))]
    resp = client.post("/v1/classify", json={"images": images, "mask_id": "m1", "top_k": 2})
    assert resp.status_code == 200, resp.text
    task = responder.classified[0]
    assert resp.json() == {
        "id": task.request_id,
        "model": VIT_DIGITS_MODEL,  # the mask's model
        "mask_id": "m1",
        "predictions": [{"labels": [{"id": 0, "label": "0", "probability": 1.0}]}] * 3,
        "timings": {"queue_ms": 1.0, "model_ms": 2.0, "batch_rows": 3},
    }
    assert task.tenant == "local" and task.images == images and task.top_k == 2 and task.rows == 3
    assert not r.exists(keys.GENERATE_REPLY_KEY.format(request_id=task.request_id))
    assert r.zcard(keys.GENERATE_INFLIGHT_KEY.format(tenant="local")) == 0  # the hold is released
    unmasked = client.post("/v1/classify", json={"images": [png()]})
    assert unmasked.status_code == 200 and unmasked.json()["model"] == VIT_DIGITS_MODEL


@pytest.mark.parametrize(
    ("error", "status"),
    [("InvalidImage", 422), ("ModelKindMismatch", 422), ("MaskNotFound", 404), ("OutOfMemory", 503)],
)
def test_worker_errors_become_statuses(redis_url, client, error, status):
    def fail(task):
        return GenerateFailed(error=ErrorInfo(type=error, message=f"{error} happened"))

    with Responder(redis_url, classify_handler=fail):
        assert_error(client.post("/v1/classify", json={"images": [png()]}), status, error, "happened")


@pytest.mark.parametrize(
    ("body", "status", "type", "message"),
    [
        ({"images": ["not base64!"]}, 422, "InvalidImage", "images[0]: not valid base64"),
        (
            {"images": [png(), base64.b64encode(b"GIF89a...").decode()]},
            422,
            "InvalidImage",
            "images[1]: not a PNG",
        ),
        ({"images": ["data:image/png;base64"]}, 422, "InvalidImage", "comma"),
        ({"images": []}, 422, "ValidationError", "images"),
        ({"images": [png()] * 33}, 422, "ValidationError", "at most 32"),
        ({"images": [png()], "top_k": 0}, 422, "ValidationError", "top_k"),
        ({"images": [png()], "model": "smollm2-135m-instruct"}, 422, "ModelKindMismatch", "/v1/generate"),
        ({"images": [png()], "model": "no/such-model"}, 422, "UnknownModel", "no/such-model"),
        ({"images": [png()], "mask_id": "nothing"}, 404, "MaskNotFound", "nothing"),
        ({"images": [png()], "mask_id": "theirs"}, 404, "MaskNotFound", "theirs"),
        ({"images": [png()], "mask_id": "text"}, 422, "ModelKindMismatch", "language model"),
        ({"images": [png()], "mask_id": "mine", "model": "vit-b"}, 422, "MaskModelMismatch", "is for model"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_queued(make_client, r, body, status, type, message):
    client = make_client(api_keys=f"{KEY_A},{KEY_B}", models="smollm2-135m-instruct,vit-b")
    put_mask(r, "theirs", TENANT_B, model=VIT_DIGITS_MODEL)
    put_mask(r, "mine", TENANT_A, model=VIT_DIGITS_MODEL)
    put_mask(r, "text", TENANT_A)  # made on the embedded language model
    before = snapshot(r)
    assert_error(client.post("/v1/classify", json=body, headers=auth(KEY_A)), status, type, message)
    assert snapshot(r) == before


def test_a_mask_made_on_an_image_classifier_cannot_generate(client, r):
    put_mask(r, "img", "local", model=VIT_DIGITS_MODEL)
    before = snapshot(r)
    assert_error(
        client.post("/v1/generate", json={"prompt": "hi", "mask_id": "img"}), 422, "ModelKindMismatch"
    )
    assert snapshot(r) == before


DIGIT_0 = {"kind": "images", "source": "builtin:digits", "labels": [0]}
OTHER_DIGITS = {"kind": "images", "source": "builtin:digits", "exclude_labels": [0]}


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/classify", {"images": [png()]}),  # the default model
        ("/v1/classify", {"images": [png()], "mask_id": "digits"}),  # the mask's model
        ("/v1/fill-mask", {"inputs": ["a <mask>"]}),
        ("/v1/unlearn", {"model": VIT_DIGITS_MODEL, "forget": DIGIT_0, "retain": OTHER_DIGITS}),
        ("/v1/evaluate", {"model": MLM_CODE_PROSE_MODEL, "datasets": [{"kind": "builtin", "name": "toxic"}]}),
    ],
)
def test_builtin_models_turned_off_are_unknown(make_client, r, route, body):
    # An operator turns off the built-in models a worker would train on first use; allowing any
    # model does not turn them back on.
    client = make_client(builtin_models="", allow_any_model=True)
    put_mask(r, "digits", "local", model=VIT_DIGITS_MODEL)
    before = snapshot(r)
    resp = client.post(route, json=body)
    assert_error(resp, 422, "UnknownModel", "SELPRUNE_BUILTIN_MODELS")
    assert snapshot(r) == before


def test_builtin_models_setting_names_only_known_ones(make_settings):
    assert make_settings(builtin_models=MLM_CODE_PROSE_MODEL).builtin_models == [MLM_CODE_PROSE_MODEL]
    with pytest.raises(ValueError, match="unknown built-in models"):
        make_settings(builtin_models="builtin:nope")
