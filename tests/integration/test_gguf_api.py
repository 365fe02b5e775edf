"""A Gemma 3 GGUF file in the worker's models root prunes through the API: POST /v1/unlearn -> Redis ->
a real worker confined to that root -> a mask, then /v1/generate serves text through the mask.

Only the model is small (tests/gguf_files.py writes a tiny random one); the gateway, queue, job code,
serving loop and GGUF loading are what production runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from selprune_core.masks import NeuronMask
from tests.gguf_files import tiny_gemma3_gguf
from tests.helpers import CORPUS, local_runtime
from tests.integration.servers import serving_thread
from worker.consumer import Worker
from worker.jobs import run_job
from worker.runtime import ModelRuntime
from worker.settings import WorkerSettings

pytestmark = pytest.mark.redis
CODE = [t for t in CORPUS if "def " in t or "import" in t or "for " in t or "class" in t]
PROSE = [t for t in CORPUS if t not in CODE]
LAYERS, D_MLP = 2, 64


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    # Overrides conftest's tiny llama folder, so the `gateway` fixture lists this file as its model.
    path, _, _ = tiny_gemma3_gguf(tmp_path / "models")
    return path


@pytest.fixture
def runtime(tmp_path: Path) -> ModelRuntime:
    # Confined like a production worker: the file loads because it lies under models_root, not
    # because it is trusted (SELPRUNE_MODELS), which would skip that check.
    return local_runtime(tmp_path)


def _run_jobs(redis_url: str, tmp_path: Path, runtime: ModelRuntime) -> None:
    settings = WorkerSettings(
        redis_url=redis_url,
        cache_dir=runtime.cache_dir,
        data_root=tmp_path,
        models_root=runtime.models_root,
        export_root=tmp_path / "exports",
        poll_block_ms=50,
    )
    client = redis.Redis.from_url(redis_url)
    try:
        runner = lambda job, ctx: run_job(job, runtime, ctx, export_root=settings.export_root)  # noqa: E731
        Worker(settings, client, runner).run(burst=True)
    finally:
        client.close()


def test_gguf_gemma3_unlearn_job_makes_a_mask_that_serves(
    gateway, redis_url, model_dir, runtime, make_settings, tmp_path
):
    body = {
        "model": str(model_dir),
        "forget": {"kind": "inline", "texts": CODE * 3},
        "retain": {"kind": "inline", "texts": PROSE * 3},
        "name": "gemma3-gguf",
        "params": {
            "ff_frac": 0.1,
            "attn_frac": 0.05,
            "steps": 2,
            "collect_tokens": 300,
            "eval_tokens": 200,
            "token_limit": 32,
            "batch_size": 4,
        },
    }
    accepted = gateway.post("/v1/unlearn", json=body)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]

    _run_jobs(redis_url, tmp_path, runtime)

    job = gateway.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job.get("error")
    assert [m["step"] for m in job["metrics"]] == [0, 1, 2]
    assert job["metrics"][-1]["ff_pruned"] > job["metrics"][1]["ff_pruned"] > 0
    mask_id = job["mask_id"]
    meta = gateway.get(f"/v1/masks/{mask_id}").json()
    assert meta["model"] == str(model_dir) and meta["name"] == "gemma3-gguf"
    blob = gateway.get(f"/v1/masks/{mask_id}/file")
    assert blob.status_code == 200
    mask = NeuronMask.from_bytes(blob.content)
    assert mask.mask_id == mask_id and tuple(mask.ff_keep.shape) == (LAYERS, D_MLP)
    assert mask.fingerprint == runtime.model(str(model_dir)).fingerprint

    # Serving shares the runtime, as the job and serving lanes of one worker process do.
    settings = make_settings(serve_batch_window_ms=5, poll_block_ms=50, models_root=runtime.models_root)
    with serving_thread(settings, redis_url, runtime):
        request = {"prompt": "the cat sat on", "max_new_tokens": 8}
        plain = gateway.post("/v1/generate", json=request | {"model": str(model_dir)})
        masked = gateway.post("/v1/generate", json=request | {"mask_id": mask_id})
    assert plain.status_code == 200, plain.text
    assert masked.status_code == 200, masked.text
    plain_body, masked_body = plain.json(), masked.json()
    assert masked_body["mask_id"] == mask_id and masked_body["model"] == str(model_dir)
    assert masked_body["usage"]["completion_tokens"] > 0 and plain_body["usage"]["completion_tokens"] > 0
    # Greedy both times: a random-init model's near-flat logits make any pruning change the text.
    assert masked_body["text"] and masked_body["text"] != plain_body["text"]
