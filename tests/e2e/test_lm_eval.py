"""lm-evaluation-harness scores a mask through our OpenAI-compatible API exactly as in-process.

Its `local-completions` model asks /v1/completions for prompt log-probabilities (token-id prompts,
echo, logprobs 1, max_tokens 1) on a real gateway socket, a real Redis and a serving loop on the
embedded model. The same task run in-process through lm-eval's `hf` model, on the base model and on a
folder with the mask folded into its weights, must give the same accuracy and the same per-choice
log-likelihoods.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import redis

from selprune_core.loading import EMBEDDED_MODEL
from selprune_core.masking import fold_into_weights
from selprune_core.sites import resolve_sites
from service.settings import GatewaySettings
from tests.e2e.conftest import cache_dir, require_setup
from tests.helpers import random_mask
from tests.integration import records
from tests.integration.servers import serving_thread, uvicorn_gateway
from tests.unit.service.helpers import KEY_A, TENANT_A
from worker.runtime import ModelRuntime
from worker.settings import WorkerSettings

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is installed by ./dev setup (the lmeval extra)")
pytestmark = pytest.mark.redis
REPO = Path(__file__).resolve().parents[2]
TASK = "selprune_mc"


def _evaluate(model: str, model_args: dict[str, Any]) -> tuple[float, list[float]]:
    """Accuracy on the local task, and every document's per-choice log-likelihoods, flattened."""
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(REPO / "bench" / "lm_eval")),
        batch_size=1,
        log_samples=True,
    )
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    lls = [float(resp[0][0]) for s in samples for resp in s["resps"]]  # [doc x choice]
    return float(out["results"][TASK]["acc,none"]), lls


def test_local_completions_through_a_mask_equal_in_process_hf(redis_url, tmp_path, monkeypatch):
    require_setup()
    monkeypatch.chdir(REPO)  # the task file names its data relative to the repository root
    monkeypatch.setenv("OPENAI_API_KEY", KEY_A)
    runtime = ModelRuntime(cache_dir=cache_dir(), data_root=tmp_path, device="cpu", dtype="float32")
    loaded = runtime.model(EMBEDDED_MODEL)
    mask = random_mask(loaded.model, seed=0, frac=0.2)
    client = redis.Redis.from_url(redis_url)
    mask_id = records.store_mask(
        client, mask.to_bytes(), {"model": EMBEDDED_MODEL, "name": "random"}, TENANT_A
    )
    folded_dir, base_dir = tmp_path / "folded", cache_dir() / "models" / EMBEDDED_MODEL
    folded = copy.deepcopy(loaded.model)
    fold_into_weights(folded, resolve_sites(folded), mask)  # the copy's own sites: the served model stays
    folded.save_pretrained(folded_dir)
    loaded.tokenizer.save_pretrained(folded_dir)
    del folded

    worker = WorkerSettings(
        redis_url=redis_url, worker_id="w-lm-eval", serve_batch_window_ms=5, poll_block_ms=50
    )
    gateway = GatewaySettings(
        redis_url=redis_url,
        data_root=tmp_path,
        models=[EMBEDDED_MODEL],
        api_keys=KEY_A,
        sse_block_ms=200,
        allowed_hosts=["127.0.0.1"],
    )
    with serving_thread(worker, redis_url, runtime), uvicorn_gateway(gateway) as url:
        served = {
            name: _evaluate(
                "local-completions",
                {
                    "model": name,
                    "base_url": f"{url}/v1/completions",
                    "tokenizer_backend": "huggingface",
                    "tokenizer": str(base_dir),
                    "num_concurrent": 1,
                    "max_retries": 1,
                },
            )
            for name in (EMBEDDED_MODEL, f"{EMBEDDED_MODEL}@{mask_id}")
        }
    in_process = {
        name: _evaluate("hf", {"pretrained": str(path), "dtype": "float32", "device": "cpu"})
        for name, path in ((EMBEDDED_MODEL, base_dir), (f"{EMBEDDED_MODEL}@{mask_id}", folded_dir))
    }
    for name, (accuracy, lls) in served.items():
        hf_accuracy, hf_lls = in_process[name]
        print(f"{TASK} {name}: accuracy {accuracy:.4f} served, {hf_accuracy:.4f} in-process")  # pytest -s
        assert accuracy == hf_accuracy, name
        assert lls == pytest.approx(hf_lls, abs=2e-3), name
    assert served[EMBEDDED_MODEL][1] != pytest.approx(served[f"{EMBEDDED_MODEL}@{mask_id}"][1], abs=1e-2)
