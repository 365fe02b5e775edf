"""Masked LMs end to end: HTTP -> the real gateway -> Redis -> a real worker (in a thread) running the
real job code on a tiny random-init RoBERTa MLM under the models root -> mask (with its kind), the
masked_token evaluation, and an export that AutoModelForMaskedLM reloads to the hooked model's logits;
then /v1/fill-mask through the job's mask, served by the real serving loop, equal to that export."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForMaskedLM

from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from service.main import create_app
from service.settings import GatewaySettings
from tests.helpers import local_runtime
from tests.integration.servers import serving_thread, wait_for
from tests.mlm_helpers import CODE, PROSE, build_mlm_model, roberta_tokenizer
from worker.jobs import run_job
from worker.runtime import ModelRuntime

pytestmark = pytest.mark.redis
CODE_TEXTS = [f"{text}\n# {i}" for i in range(6) for text in CODE]
PROSE_TEXTS = [f"{text} number {i}" for i in range(6) for text in PROSE]
FORGET = {"kind": "inline", "texts": CODE_TEXTS}
RETAIN = {"kind": "inline", "texts": PROSE_TEXTS}


def save_tiny_mlm(folder: Path) -> None:
    tokenizer = roberta_tokenizer()
    build_mlm_model("roberta", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture
def runtime(tmp_path: Path) -> ModelRuntime:
    save_tiny_mlm(tmp_path / "models" / "mlm")
    return local_runtime(tmp_path)


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = GatewaySettings(
        redis_url=redis_url, data_root=tmp_path, models=["mlm"], sse_block_ms=50, allowed_hosts=["testserver"]
    )
    with TestClient(create_app(settings)) as client:
        yield client


def _finished(gateway: TestClient, job_id: str, state: str = "succeeded") -> dict:
    def done() -> dict | None:
        job = gateway.get(f"/v1/jobs/{job_id}").json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(done, timeout=180, interval=0.1)
    assert job["state"] == state, job.get("error")
    return job


def test_unlearn_evaluate_export_and_fill_a_masked_lm_over_http(
    gateway, runtime, start_worker, make_settings, redis_url, tmp_path
):
    exports = tmp_path / "exports"
    start_worker(lambda job, ctx: run_job(job, runtime, ctx, export_root=exports), poll_block_ms=50)
    body = {
        "model": "mlm",
        "forget": FORGET,
        "retain": RETAIN,
        "params": {"steps": 2, "ff_frac": 0.05, "attn_frac": 0.02, "batch_size": 8, "collect_tokens": 2000},
    }
    accepted = gateway.post("/v1/unlearn", json=body)
    assert accepted.status_code == 202, accepted.text
    job = _finished(gateway, accepted.json()["job_id"])
    assert [m["step"] for m in job["metrics"]] == [0, 1, 2] and job["metrics"][-1]["ff_pruned"] > 0
    assert set(job["metrics"][0]["metrics"]) == {"forget", "retain"}
    assert gateway.get(f"/v1/jobs/{job['job_id']}/plot").content.startswith(b"\x89PNG")
    mask_id = job["mask_id"]
    meta = gateway.get(f"/v1/masks/{mask_id}").json()
    assert meta["model"] == "mlm" and meta["data_kind"] == "text" and meta["model_kind"] == "masked_lm"

    body = {"model": "mlm", "mask_id": mask_id, "datasets": [FORGET, RETAIN], "metrics": ["masked_token"]}
    evaluation = gateway.post("/v1/evaluate", json=body)
    assert evaluation.status_code == 202, evaluation.text
    results = _finished(gateway, evaluation.json()["job_id"])["result"]["results"]
    for variant in ("base", "masked"):
        assert results[variant]
        for result in results[variant].values():
            metric = result["masked_token"]
            assert 0 <= metric["top1"] <= 1 and metric["n_tokens"] > 0 and len(metric["ci"]["top1"]) == 2

    export = gateway.post(f"/v1/masks/{mask_id}/export")
    assert export.status_code == 202, export.text
    folder = exports / _finished(gateway, export.json()["job_id"])["result"]["path"]
    exported = AutoModelForMaskedLM.from_pretrained(folder).eval()
    assert (folder / "tokenizer.json").is_file()
    target = runtime.masked_lm("mlm")
    mask = NeuronMask.from_bytes(gateway.get(f"/v1/masks/{mask_id}/file").content)
    batch = target.tokenizer(CODE_TEXTS[:4] + PROSE_TEXTS[:4], return_tensors="pt", padding=True)
    with torch.no_grad(), apply_mask(target.model, target.sites, mask):
        hooked = target.model(**batch).logits
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, hooked, atol=1e-5, rtol=1e-5)

    # /v1/fill-mask through the job's mask answers what the exported checkpoint answers.
    inputs = ["def add(a, b):\n    return a <mask> b", "the cat sat on the <mask> and the <mask> sat"]
    with serving_thread(make_settings(poll_block_ms=50), redis_url, runtime):
        body = {"model": "mlm", "mask_id": mask_id, "inputs": inputs, "top_k": 10}
        answer = gateway.post("/v1/fill-mask", json=body)
        no_mask = gateway.post("/v1/fill-mask", json={"model": "mlm", "inputs": ["a <mask>", "no mask"]})
        too_long = gateway.post("/v1/fill-mask", json={"model": "mlm", "inputs": ["word " * 80 + "<mask>"]})
    assert answer.status_code == 200, answer.text
    for text, result in zip(inputs, answer.json()["results"], strict=True):
        encoded = target.tokenizer(text)["input_ids"]
        positions = [p for p, i in enumerate(encoded) if i == target.tokenizer.mask_token_id]
        assert [m["position"] for m in result["masks"]] == positions
        with torch.no_grad():
            expected = exported(input_ids=torch.tensor([encoded])).logits[0, positions].softmax(-1)
        for row, fill in enumerate(result["masks"]):
            ids = [t["id"] for t in fill["tokens"]]
            assert ids[0] == int(expected[row].argmax())
            got = torch.tensor([t["probability"] for t in fill["tokens"]])
            torch.testing.assert_close(got, expected[row][ids], atol=1e-5, rtol=0)
        assert isinstance(result["filled"], str) and "<mask>" not in result["filled"]
    assert no_mask.status_code == 422 and no_mask.json()["error"]["type"] == "InvalidInput"
    assert no_mask.json()["error"]["message"].startswith("inputs[1] has no mask token")
    assert too_long.status_code == 422 and "positions hold 62" in too_long.json()["error"]["message"]


def test_a_local_masked_lm_gets_its_own_metric_and_refuses_text_metrics(gateway, runtime, start_worker):
    start_worker(lambda job, ctx: run_job(job, runtime, ctx), poll_block_ms=50)
    # No metrics named: the gateway cannot tell a folder's kind; the worker evaluates masked_token.
    accepted = gateway.post("/v1/evaluate", json={"model": "mlm", "datasets": [RETAIN], "eval_tokens": 50})
    results = _finished(gateway, accepted.json()["job_id"])["result"]["results"]
    assert [set(r) for r in results["base"].values()] == [{"masked_token"}]

    body = {"model": "mlm", "datasets": [RETAIN], "metrics": ["next_token"]}
    accepted = gateway.post("/v1/evaluate", json=body)
    job = _finished(gateway, accepted.json()["job_id"], state="failed")
    assert job["error"]["type"] == "ConfigError" and "masked_token" in job["error"]["message"]
    assert job["attempts"] == 1
