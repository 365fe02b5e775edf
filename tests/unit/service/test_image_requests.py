"""Image classifiers at the gateway: image dataset references in /v1/unlearn and /v1/evaluate, what a
valid request queues, and every malformed reference refused with a clear 4xx and Redis unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol import VIT_DIGITS_MODEL, EvaluateJob, ImageData, PruneJob, keys
from tests.unit.service.helpers import assert_error, snapshot

pytestmark = pytest.mark.redis

FORGET = {"kind": "images", "source": "builtin:digits", "labels": [0]}
RETAIN = {"kind": "images", "source": "builtin:digits", "exclude_labels": [0]}


def unlearn(**overrides: Any) -> dict[str, Any]:
    return {"model": VIT_DIGITS_MODEL, "forget": FORGET, "retain": RETAIN} | overrides


def _payload(r, job_id: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(r.hget(keys.JOB_KEY.format(job_id=job_id), "payload"))
    return payload


def test_an_image_unlearn_job_is_queued_with_its_references(client, r, data_root: Path):
    np.savez(data_root / "shapes.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    extra = {"kind": "images", "source": "shapes.npz", "labels": [1, 2]}
    resp = client.post("/v1/unlearn", json=unlearn(eval=[extra], params={"steps": 2, "batch_size": 64}))
    assert resp.status_code == 202, resp.text
    job = PruneJob.model_validate(_payload(r, resp.json()["job_id"]))  # what the worker re-validates
    assert job.model == VIT_DIGITS_MODEL and job.images
    assert isinstance(job.forget, ImageData) and job.forget.labels == [0]
    assert isinstance(job.retain, ImageData) and job.retain.exclude_labels == [0]
    assert job.eval is not None and job.eval[0].describe() == "images:shapes.npz[1,2]"


def test_an_image_evaluation_measures_accuracy_by_default(client, r):
    body = {"model": VIT_DIGITS_MODEL, "datasets": [{"kind": "images", "source": "builtin:digits"}]}
    resp = client.post("/v1/evaluate", json=body)
    assert resp.status_code == 202, resp.text
    job = EvaluateJob.model_validate(_payload(r, resp.json()["job_id"]))
    assert job.metrics == ["accuracy"] and job.images


@pytest.mark.parametrize(
    ("change", "status", "type", "message"),
    [
        ({"forget": FORGET | {"labels": ["0"]}}, 422, "ValidationError", "forget.images.labels.0"),
        ({"forget": FORGET | {"labels": [True]}}, 422, "ValidationError", "valid integer"),
        ({"forget": FORGET | {"labels": [1.5]}}, 422, "ValidationError", "valid integer"),
        ({"forget": FORGET | {"labels": [-1]}}, 422, "ValidationError", "greater than or equal to 0"),
        ({"forget": FORGET | {"labels": []}}, 422, "ValidationError", "at least 1 item"),
        ({"forget": FORGET | {"labels": [3, 3]}}, 422, "ValidationError", "labels names a class id twice"),
        ({"forget": FORGET | {"exclude_labels": [1]}}, 422, "ValidationError", "not both"),
        ({"forget": FORGET | {"source": ""}}, 422, "ValidationError", "forget.images.source"),
        ({"forget": FORGET | {"colour": "red"}}, 422, "ValidationError", "Extra inputs"),
        ({"forget": FORGET | {"source": "builtin:cifar"}}, 422, "UnknownDataset", "builtin:digits"),
        ({"forget": FORGET | {"source": "../x.npz"}}, 422, "PathOutsideDataRoot", "forget.source"),
        ({"forget": FORGET | {"source": "/etc/x.npz"}}, 422, "PathOutsideDataRoot", "relative"),
        ({"forget": FORGET | {"source": "forget.jsonl"}}, 422, "InvalidDataset", ".npz"),
        ({"forget": FORGET | {"source": "missing.npz"}}, 422, "DatasetNotFound", "missing.npz"),
        ({"retain": {"kind": "builtin", "name": "english_prose"}}, 422, "ValidationError", "texts or images"),
        ({"eval": [{"kind": "inline", "texts": ["x"]}]}, 422, "ValidationError", "texts or images"),
        ({"model": "smollm2-135m-instruct"}, 422, "ValidationError", "is a language model"),
        ({"params": {"budget": {"max_retain_drop": 0.1}}}, 422, "ValidationError", "params.budget"),
        ({"params": {"ff_scoring": "taylor"}}, 422, "ValidationError", "params.ff_scoring"),
        ({"params": {"pack": True}}, 422, "ValidationError", "params.pack"),
    ],
)
def test_malformed_image_jobs_are_refused_and_nothing_is_stored(client, r, change, status, type, message):
    before = snapshot(r)
    assert_error(client.post("/v1/unlearn", json=unlearn(**change)), status, type, message)
    assert snapshot(r) == before


def test_a_builtin_image_classifier_takes_no_texts(client, r):
    before = snapshot(r)
    texts = {"forget": {"kind": "inline", "texts": ["a"]}, "retain": {"kind": "inline", "texts": ["b"]}}
    assert_error(
        client.post("/v1/unlearn", json=unlearn(**texts)), 422, "ValidationError", "image classifier"
    )
    body = {"model": VIT_DIGITS_MODEL, "prompt": "hello"}
    assert_error(client.post("/v1/generate", json=body), 422, "ModelKindMismatch", "/v1/classify")
    assert snapshot(r) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metrics": ["toxicity"]}, "are for texts"),
        ({"metrics": ["accuracy", "membership"]}, "are for texts"),
        (
            {
                "model": "smollm2-135m-instruct",
                "datasets": [{"kind": "inline", "texts": ["x"]}],
                "metrics": ["accuracy"],
            },
            "are for image datasets",
        ),
        (
            {
                "datasets": [
                    {"kind": "images", "source": "builtin:digits"},
                    {"kind": "builtin", "name": "toxic"},
                ]
            },
            "not both",
        ),
    ],
)
def test_image_metrics_go_with_image_datasets(client, r, change, message):
    before = snapshot(r)
    body = {"model": VIT_DIGITS_MODEL, "datasets": [{"kind": "images", "source": "builtin:digits"}]} | change
    assert_error(client.post("/v1/evaluate", json=body), 422, "ValidationError", message)
    assert snapshot(r) == before
