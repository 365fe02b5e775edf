"""`python -m worker` with both roles: generation is answered while a long unlearning job runs in the
same process, on the same model copy, and the job's masks do not leak into served text."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.test_end_to_end import CODE, PROSE, REPO, _unlearn_body

pytestmark = pytest.mark.redis


def _spawn_worker(redis_url: str, tmp_path, roles: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SELPRUNE_REDIS_URL": redis_url,
        "SELPRUNE_ROLES": roles,
        "SELPRUNE_CACHE_DIR": str(tmp_path / "cache"),
        "SELPRUNE_DATA_ROOT": str(tmp_path),
        "SELPRUNE_MODELS_ROOT": str(tmp_path),  # the tiny checkpoint lives here
        "SELPRUNE_DEVICE": "cpu",
        "SELPRUNE_POLL_BLOCK_MS": "100",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.Popen([sys.executable, "-m", "worker"], env=env, cwd=REPO)


def _wait(predicate, what: str, worker: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert worker.poll() is None, f"worker exited with {worker.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_generation_is_served_while_a_long_job_runs(gateway, redis_url, model_dir, tmp_path):
    prompt = {"prompt": "def main():", "max_new_tokens": 8, "model": str(model_dir)}
    worker = _spawn_worker(redis_url, tmp_path, "jobs,serve")
    try:
        _wait(lambda: gateway.get("/readyz").status_code == 200, "readiness", worker)
        before = gateway.post("/v1/generate", json=prompt)
        assert before.status_code == 200, before.text

        # Many slow steps pruning both components, so the job's hooks are live during the request.
        body = _unlearn_body(
            model_dir, steps=50, ff_frac=0.01, attn_frac=0.01, collect_tokens=20_000, token_limit=64
        )
        body["forget"]["texts"] = CODE * 200
        body["retain"]["texts"] = PROSE * 200
        job_id = gateway.post("/v1/unlearn", json=body).json()["job_id"]
        _wait(lambda: len(gateway.get(f"/v1/jobs/{job_id}").json()["metrics"]) >= 2, "job step 1", worker)

        during = gateway.post("/v1/generate", json=prompt)
        assert during.status_code == 200, during.text
        assert gateway.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
        assert during.json()["text"] == before.json()["text"]  # the job's mask is not in our forward pass

        assert gateway.delete(f"/v1/jobs/{job_id}").status_code == 200  # 409 had it finished already
        _wait(lambda: gateway.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled", "cancel", worker, 30)
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
    assert code == 0


def test_a_serving_only_worker_takes_no_jobs(gateway, redis_url, model_dir, tmp_path):
    worker = _spawn_worker(redis_url, tmp_path, "serve")
    try:
        _wait(lambda: gateway.get("/readyz").status_code == 200, "readiness", worker)
        assert gateway.get("/readyz").json()["servers"] == 1
        assert gateway.get("/readyz").json()["workers"] == 0
        reply = gateway.post(
            "/v1/generate", json={"prompt": "hello", "max_new_tokens": 3, "model": str(model_dir)}
        )
        assert reply.status_code == 200, reply.text
        job_id = gateway.post("/v1/unlearn", json=_unlearn_body(model_dir)).json()["job_id"]
        time.sleep(0.5)
        assert gateway.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
    assert code == 0
