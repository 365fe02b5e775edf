"""POST /v1/fill-mask at the gateway: every rejection before queueing (kind of model, inputs without
"<mask>" for the built-in masked LM, counts and sizes, masks of another tenant) answered with a 4xx
naming the field, Redis unchanged."""

from __future__ import annotations

import pytest

from protocol import EMBEDDED_MODEL, MLM_CODE_PROSE_MODEL, VIT_DIGITS_MODEL
from protocol.fill_mask import MAX_FILL_CHARS, MAX_FILL_INPUTS
from tests.unit.service.helpers import assert_error, put_mask, snapshot

pytestmark = pytest.mark.redis


@pytest.mark.parametrize(
    ("body", "type", "message"),
    [
        ({"inputs": ["a <mask>", "no mask here"]}, "InvalidInput", "inputs[1] has no mask token"),
        ({"model": EMBEDDED_MODEL, "inputs": ["a <mask>"]}, "ModelKindMismatch", "use /v1/generate"),
        ({"model": VIT_DIGITS_MODEL, "inputs": ["a <mask>"]}, "ModelKindMismatch", "use /v1/classify"),
        ({"model": "elsewhere", "inputs": ["a <mask>"]}, "UnknownModel", "elsewhere"),
        ({"inputs": []}, "ValidationError", "inputs"),
        ({"inputs": ["<mask>"] * (MAX_FILL_INPUTS + 1)}, "ValidationError", "inputs"),
        ({"inputs": ["<mask>" + "a" * MAX_FILL_CHARS]}, "ValidationError", "inputs.0"),
        ({"inputs": ["<mask>"], "top_k": 0}, "ValidationError", "top_k"),
    ],
)
def test_bad_requests_are_refused_before_queueing(client, r, body, type, message):
    before = snapshot(r)
    assert_error(client.post("/v1/fill-mask", json=body), 422, type, message)
    assert snapshot(r) == before


def test_a_mask_on_another_model_or_tenant_is_refused(client, r):
    put_mask(r, "m1", "local", model="elsewhere")
    before = snapshot(r)
    body = {"model": MLM_CODE_PROSE_MODEL, "mask_id": "m1", "inputs": ["a <mask>"]}
    assert_error(client.post("/v1/fill-mask", json=body), 422, "MaskModelMismatch", "m1")
    assert_error(
        client.post("/v1/fill-mask", json={"mask_id": "nope", "inputs": ["<mask>"]}), 404, "MaskNotFound"
    )
    assert snapshot(r) == before
