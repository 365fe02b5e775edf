"""Image classifiers end to end: HTTP -> the real gateway -> Redis -> a real worker (in a thread) running
the real job code on a tiny random-init ViT under the models root -> mask, metrics, plot, evaluation and
export back over HTTP; then /v1/classify through the job's mask, served by the real serving loop, equal to
the exported checkpoint reloaded."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForImageClassification

from protocol import ImageData
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from service.main import create_app
from service.settings import GatewaySettings
from tests.helpers import build_vit, local_runtime
from tests.integration.servers import serving_thread, wait_for
from worker.image_models import preprocess
from worker.jobs import run_job
from worker.runtime import ModelRuntime

pytestmark = pytest.mark.redis
FORGET = {"kind": "images", "source": "builtin:digits", "labels": [0]}
RETAIN = {"kind": "images", "source": "builtin:digits", "exclude_labels": [0]}


@pytest.fixture
def runtime(tmp_path: Path) -> ModelRuntime:
    build_vit().save_pretrained(tmp_path / "models" / "vit")
    return local_runtime(tmp_path)


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = GatewaySettings(
        redis_url=redis_url, data_root=tmp_path, models=["vit"], sse_block_ms=50, allowed_hosts=["testserver"]
    )
    with TestClient(create_app(settings)) as client:
        yield client


def _finished(gateway: TestClient, job_id: str) -> dict:
    def done() -> dict | None:
        job = gateway.get(f"/v1/jobs/{job_id}").json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(done, timeout=180, interval=0.1)
    assert job["state"] == "succeeded", job.get("error")
    return job


def test_unlearn_evaluate_export_and_classify_over_http(
    gateway, runtime, start_worker, make_settings, redis_url, tmp_path
):
    exports = tmp_path / "exports"
    start_worker(lambda job, ctx: run_job(job, runtime, ctx, export_root=exports), poll_block_ms=50)
    body = {
        "model": "vit",
        "forget": FORGET,
        "retain": RETAIN,
        "name": "no-zeros",
        "params": {"steps": 2, "ff_frac": 0.05, "attn_frac": 0.02, "batch_size": 64, "collect_tokens": 2000},
    }
    accepted = gateway.post("/v1/unlearn", json=body)
    assert accepted.status_code == 202, accepted.text
    job = _finished(gateway, accepted.json()["job_id"])
    assert [m["step"] for m in job["metrics"]] == [0, 1, 2] and job["metrics"][-1]["ff_pruned"] > 0
    assert set(job["metrics"][0]["metrics"]) == {"forget", "retain"}
    plot = gateway.get(f"/v1/jobs/{job['job_id']}/plot")
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
    mask_id = job["mask_id"]
    meta = gateway.get(f"/v1/masks/{mask_id}").json()
    assert (
        meta["model"] == "vit"
        and meta["data_kind"] == "images"
        and meta["retain"] == "images:builtin:digits[-0]"
    )

    evaluation = gateway.post(
        "/v1/evaluate", json={"model": "vit", "mask_id": mask_id, "datasets": [FORGET, RETAIN]}
    )
    assert evaluation.status_code == 202, evaluation.text
    results = _finished(gateway, evaluation.json()["job_id"])["result"]["results"]
    forget = results["masked"]["images:builtin:digits[0]"]["accuracy"]
    assert forget["n_images"] == 53 and [c["class_id"] for c in forget["per_class"]] == [0]
    assert len(results["base"]["images:builtin:digits[-0]"]["accuracy"]["per_class"]) == 9

    export = gateway.post(f"/v1/masks/{mask_id}/export")
    assert export.status_code == 202, export.text
    folder = exports / _finished(gateway, export.json()["job_id"])["result"]["path"]
    exported = AutoModelForImageClassification.from_pretrained(folder).eval()
    classifier = runtime.classifier("vit")
    mask = NeuronMask.from_bytes(gateway.get(f"/v1/masks/{mask_id}/file").content)
    pixels = runtime.image_dataset(ImageData.model_validate(RETAIN), classifier).heldout.pixels[:16]
    with torch.no_grad(), apply_mask(classifier.model, classifier.sites, mask):
        hooked = classifier.model(pixel_values=pixels).logits
    with torch.no_grad():
        torch.testing.assert_close(exported(pixel_values=pixels).logits, hooked, atol=1e-5, rtol=1e-5)

    # /v1/classify through the job's mask answers what the exported checkpoint answers.
    from sklearn.datasets import load_digits

    raw = load_digits().images[:8] / 16.0  # [8, 8, 8] intensities in [0, 1], as .npy files
    with serving_thread(make_settings(poll_block_ms=50), redis_url, runtime):
        body = {"model": "vit", "mask_id": mask_id, "images": [_npy(image) for image in raw], "top_k": 10}
        answer = gateway.post("/v1/classify", json=body)
    assert answer.status_code == 200, answer.text
    inputs = preprocess(torch.from_numpy(raw[:, None]).float(), classifier.preprocess)
    with torch.no_grad():
        expected = exported(pixel_values=inputs).logits.softmax(-1)
    for row, prediction in enumerate(answer.json()["predictions"]):
        got = {label["id"]: label["probability"] for label in prediction["labels"]}
        assert max(got, key=lambda c: got[c]) == int(expected[row].argmax())
        torch.testing.assert_close(
            torch.tensor([got[c] for c in range(10)]), expected[row], atol=1e-5, rtol=0
        )


def _npy(array) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_text_job_naming_an_image_classifier_fails_as_the_callers_error(gateway, runtime, start_worker):
    start_worker(lambda job, ctx: run_job(job, runtime, ctx), poll_block_ms=50)
    body = {
        "model": "vit",
        "forget": {"kind": "inline", "texts": ["a b"]},
        "retain": {"kind": "inline", "texts": ["c"]},
    }
    job_id = gateway.post("/v1/unlearn", json=body).json()["job_id"]
    job = wait_for(
        lambda: (j := gateway.get(f"/v1/jobs/{job_id}").json())["state"] == "failed" and j, timeout=60
    )
    assert job["error"]["type"] == "ConfigError" and "'vit' is an image classifier" in job["error"]["message"]
    assert job["attempts"] == 1  # the caller's fault: failed once, not retried
