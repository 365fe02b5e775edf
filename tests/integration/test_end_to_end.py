"""HTTP -> Redis -> worker -> mask -> HTTP, with the real gateway, queue, job code and a tiny model.

Only the model is small: everything else is what production runs, including a worker process killed
with SIGKILL in the middle of a real pruning job.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

from protocol import keys
from selprune_core.masks import NeuronMask
from tests.helpers import CORPUS
from worker.consumer import Worker
from worker.jobs import run_job
from worker.runtime import ModelRuntime
from worker.settings import WorkerSettings

pytestmark = pytest.mark.redis
REPO = Path(__file__).resolve().parents[2]
CODE = [t for t in CORPUS if "def " in t or "import" in t or "for " in t or "class" in t]
PROSE = [t for t in CORPUS if t not in CODE]


def _worker(redis_url: str, tmp_path: Path, **overrides) -> Worker:
    settings = WorkerSettings(
        redis_url=redis_url,
        cache_dir=tmp_path / "cache",
        data_root=tmp_path,
        export_root=tmp_path / "exports",
        poll_block_ms=50,
        **overrides,
    )
    runtime = ModelRuntime(cache_dir=settings.cache_dir, data_root=tmp_path, device="cpu", dtype="float32")
    return Worker(
        settings,
        redis.Redis.from_url(redis_url),
        lambda job, ctx: run_job(job, runtime, ctx, export_root=settings.export_root),
    )


def _unlearn_body(model_dir: Path, **params) -> dict:
    return {
        "model": str(model_dir),
        "forget": {"kind": "inline", "texts": CODE * 3},
        "retain": {"kind": "inline", "texts": PROSE * 3},
        "name": "tiny-code",
        "params": {
            "ff_frac": 0.1,
            "attn_frac": 0.05,
            "steps": 2,
            "collect_tokens": 300,
            "eval_tokens": 200,
            "token_limit": 32,
            "batch_size": 4,
            **params,
        },
    }


def test_unlearn_job_produces_a_mask_served_by_the_api(gateway, redis_url, model_dir, tmp_path):
    accepted = gateway.post("/v1/unlearn", json=_unlearn_body(model_dir))
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    assert gateway.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"

    _worker(redis_url, tmp_path).run(burst=True)

    job = gateway.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job.get("error")
    assert [m["step"] for m in job["metrics"]] == [0, 1, 2]
    assert set(job["metrics"][0]["metrics"]) == {"forget", "retain"}
    assert job["metrics"][-1]["ff_pruned"] > job["metrics"][1]["ff_pruned"] > 0
    mask_id = job["mask_id"]

    meta = gateway.get(f"/v1/masks/{mask_id}").json()
    assert meta["model"] == str(model_dir) and meta["name"] == "tiny-code"
    assert len(meta["trajectory"]) == 3 and meta["pruned"]["ff"] == job["metrics"][-1]["ff_pruned"]
    blob = gateway.get(f"/v1/masks/{mask_id}/file")
    assert blob.status_code == 200 and NeuronMask.from_bytes(blob.content).mask_id == mask_id
    assert [m["mask_id"] for m in gateway.get("/v1/masks").json()["masks"]] == [mask_id]

    # The event stream replays the whole job and ends on its final state.
    events = gateway.get(f"/v1/jobs/{job_id}/events").text
    assert "event: step" in events and events.rstrip().splitlines()[-1].startswith("data:")
    assert '"succeeded"' in events.rstrip().splitlines()[-1]

    # Export folds the mask into a checkpoint that transformers loads.
    export = gateway.post(f"/v1/masks/{mask_id}/export")
    assert export.status_code == 202, export.text
    _worker(redis_url, tmp_path).run(burst=True)
    done = gateway.get(f"/v1/jobs/{export.json()['job_id']}").json()
    assert done["state"] == "succeeded", done.get("error")
    from transformers import AutoModelForCausalLM

    assert done["result"]["path"] == mask_id  # a name under the export root, not a server path
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exports" / done["result"]["path"])
    mask = NeuronMask.from_bytes(blob.content)
    down = exported.model.layers[0].mlp.down_proj.weight  # [d_model, d_mlp]
    assert (down[:, ~mask.ff_keep[0]] == 0).all() and (down[:, mask.ff_keep[0]] != 0).any()


def test_evaluate_job_compares_base_and_mask(gateway, redis_url, model_dir, tmp_path):
    job_id = gateway.post("/v1/unlearn", json=_unlearn_body(model_dir, steps=1)).json()["job_id"]
    _worker(redis_url, tmp_path).run(burst=True)
    mask_id = gateway.get(f"/v1/jobs/{job_id}").json()["mask_id"]
    body = {
        "model": str(model_dir),
        "mask_id": mask_id,
        "datasets": [{"kind": "inline", "texts": CODE}],
        "eval_tokens": 100,
        "token_limit": 32,
        "metrics": ["next_token", "membership", "relearn"],
        "relearn_steps": 2,
    }
    accepted = gateway.post("/v1/evaluate", json=body)
    assert accepted.status_code == 202, accepted.text
    _worker(redis_url, tmp_path).run(burst=True)
    result = gateway.get(f"/v1/jobs/{accepted.json()['job_id']}").json()
    assert result["state"] == "succeeded", result.get("error")
    results = result["result"]["results"]
    base = results["base"]["inline:4 texts"]["next_token"]
    masked = results["masked"]["inline:4 texts"]["next_token"]
    assert base["n_tokens"] == masked["n_tokens"] and base["loss"] != masked["loss"]
    for variant in ("base", "masked"):  # the attack metrics cross the queue as plain JSON
        one = results[variant]["inline:4 texts"]
        assert 0.0 <= one["membership"]["auc"] <= 1.0 and len(one["membership"]["ci"]) == 2
        assert one["relearn"]["after"]["n_tokens"] == one["next_token"]["n_tokens"]
        assert one["relearn"]["steps"] == 2 and one["relearn"]["train_tokens"] > 0


KILLABLE_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from tests.integration.test_end_to_end import _worker
    _worker(sys.argv[1], Path(sys.argv[2]), worker_id="doomed", lease_seconds=1.0, visibility_timeout=1.0).run()
    """
)


def test_killed_worker_mid_job_is_finished_by_another_without_lost_or_repeated_steps(
    gateway, redis_url, model_dir, tmp_path
):
    # Enough collection per step that the job runs for seconds, so the kill lands mid-job.
    body = _unlearn_body(
        model_dir, steps=6, ff_frac=0.05, attn_frac=0.0, collect_tokens=20_000, token_limit=64
    )
    body["forget"]["texts"] = CODE * 200
    body["retain"]["texts"] = PROSE * 200
    job_id = gateway.post("/v1/unlearn", json=body).json()["job_id"]
    steps_key = keys.JOB_STEPS_KEY.format(job_id=job_id)
    r = redis.Redis.from_url(redis_url)
    doomed = subprocess.Popen([sys.executable, "-c", KILLABLE_WORKER, redis_url, str(tmp_path), str(REPO)])
    try:
        deadline = time.monotonic() + 120
        while r.llen(steps_key) < 2:  # step 0 (baseline) and step 1 are recorded
            assert doomed.poll() is None, "worker exited early"
            assert time.monotonic() < deadline, "the job never reached step 1"
            time.sleep(0.05)
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    recorded_before_kill = r.llen(steps_key)
    assert recorded_before_kill < 7, "the job finished before the kill; make it slower"
    assert gateway.get(f"/v1/jobs/{job_id}").json()["state"] == "running"

    time.sleep(1.2)  # the dead worker's lease and visibility timeout run out
    _worker(redis_url, tmp_path, lease_seconds=1.0, visibility_timeout=1.0).run(burst=True)

    job = gateway.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job.get("error")
    assert [m["step"] for m in job["metrics"]] == list(range(7))
    assert job["attempts"] == 2
    masks = gateway.get("/v1/masks").json()["masks"]
    assert [m["mask_id"] for m in masks] == [job["mask_id"]]
    # The resumed run pruned exactly what an uninterrupted one does at each step.
    pruned = [m["ff_pruned"] for m in job["metrics"]]
    assert pruned == [pruned[1] * i for i in range(7)]
    r.close()


def test_budget_job_reports_every_trial(gateway, redis_url, model_dir, tmp_path):
    # A budget of zero perplexity increase. A random-init model's perplexity moves by ~1e-3 either way
    # when neurons are zeroed; at these fractions some trials raise it, are rejected and retried smaller.
    budget = {"max_retain_ppl_increase": 0.0, "min_frac_ratio": 0.2}
    body = _unlearn_body(
        model_dir, recipe="paper", ff_frac=0.3, attn_frac=0.1, token_limit=64, steps=3, budget=budget
    )
    job_id = gateway.post("/v1/unlearn", json=body).json()["job_id"]

    _worker(redis_url, tmp_path).run(burst=True)

    job = gateway.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job.get("error")
    trials = job["metrics"][1:]
    rejected = [t for t in trials if not t["accepted"]]
    assert rejected, "no trial was rejected: the budget was not exercised"
    assert all(t["budget"]["broken"] and not t["metrics"] for t in rejected)
    assert all(t["budget"]["retain_ppl_increase"] <= 0.0 for t in trials if t["accepted"])
    events = gateway.get(f"/v1/jobs/{job_id}/events").text
    assert events.count('"accepted": false') == len(rejected)  # every trial was streamed as an event
    mask = gateway.get(f"/v1/masks/{job['mask_id']}").json()
    assert mask["params"]["recipe"] == "paper" and mask["params"]["budget"]["max_retain_ppl_increase"] == 0.0


def test_default_jobs_store_mean_ablation_masks(gateway, redis_url, model_dir, tmp_path):
    job_id = gateway.post("/v1/unlearn", json=_unlearn_body(model_dir, steps=1)).json()["job_id"]
    _worker(redis_url, tmp_path).run(burst=True)
    job = gateway.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job.get("error")
    mask = gateway.get(f"/v1/masks/{job['mask_id']}").json()
    assert mask["params"]["recipe"] == "selprune" and mask["params"]["offset_mode"] == "retain_mean"
    assert mask["offsets"] is True  # the stored bits carry the retain means of the pruned neurons
