"""The contract's cost caps and its Unicode rule hold on both sides of the wire: a payload that the
gateway would reject fails the worker's own validation too."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from protocol import AnyJob, PruneParams
from protocol.base import surrogate_error
from protocol.params import MAX_BATCH_TOKENS

JOBS: TypeAdapter = TypeAdapter(AnyJob)
PRUNE = {
    "job_kind": "prune",
    "job_id": "j1",
    "tenant": "t",
    "forget": {"kind": "builtin", "name": "python_code"},
    "retain": {"kind": "builtin", "name": "english_prose"},
}
EVALUATE = {
    "job_kind": "evaluate",
    "job_id": "j2",
    "tenant": "t",
    "datasets": [{"kind": "builtin", "name": "toxic"}],
}


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (PRUNE | {"params": {"batch_size": 256, "token_limit": 8192}}, "batch_size x token_limit"),
        (PRUNE | {"params": {"seed": 10**100}}, "seed"),
        (PRUNE | {"params": {"ff_eps": float("inf")}}, "ff_eps"),
        (PRUNE | {"params": {"attn_eps": float("nan")}}, "attn_eps"),
        (PRUNE | {"params": {"collect_tokens": 10**12}}, "collect_tokens"),
        (PRUNE | {"eval": [{"kind": "builtin", "name": "toxic"}] * 17}, "eval"),
        (PRUNE | {"name": "x\udfff"}, "U+DFFF"),
        (EVALUATE | {"datasets": [{"kind": "builtin", "name": "toxic"}] * 5000}, "datasets"),
        (EVALUATE | {"toxicity_samples_per_prompt": 16, "toxicity_max_new_tokens": 512}, "tokens per prompt"),
        (EVALUATE | {"token_limit": 8192}, "token_limit"),
        (EVALUATE | {"seed": 2**63}, "seed"),
        ({"job_kind": "export", "job_id": "j3", "tenant": "t", "mask_id": "../../etc"}, "mask_id"),
    ],
)
def test_the_worker_refuses_a_payload_over_a_cap(payload, fragment):
    with pytest.raises(ValidationError) as caught:
        JOBS.validate_python(payload)
    assert fragment in str(caught.value)


def test_defaults_and_values_at_the_caps_validate():
    JOBS.validate_python(PRUNE)
    JOBS.validate_python(EVALUATE)
    params = PruneParams(batch_size=MAX_BATCH_TOKENS // 512, token_limit=512, seed=2**32 - 1)
    assert params.batch_size * params.token_limit == MAX_BATCH_TOKENS


def test_surrogate_error_names_the_path_and_never_holds_the_surrogate():
    assert surrogate_error({"a": ["fine", {"b": "ok"}]}) is None
    message = surrogate_error({"a": ["fine", {"b": "o\ud801k"}]})
    assert message is not None and message.startswith("a[1].b: lone surrogate U+D801 at character 1")
    assert "\ud801" not in message and message.encode()  # safe to send back as UTF-8
    assert (
        surrogate_error({"\udc00": 1})
        == "body: a field name holds a lone surrogate, which is not valid Unicode text"
    )
    assert surrogate_error("\U0001f600 beyond the BMP is fine") is None
