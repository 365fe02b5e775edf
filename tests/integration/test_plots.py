"""A real prune job through the worker leaves a trade-off plot in Redis, served by the gateway.

Tiny model, real gateway, real Redis, real worker and job code (as in test_end_to_end.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from protocol import keys
from service.main import create_app
from service.settings import GatewaySettings
from tests.helpers import CORPUS
from worker import plots
from worker.consumer import Worker
from worker.jobs import run_job
from worker.runtime import ModelRuntime
from worker.settings import WorkerSettings

pytestmark = pytest.mark.redis
CODE = [t for t in CORPUS if "def " in t or "import" in t or "for " in t or "class" in t]
PROSE = [t for t in CORPUS if t not in CODE]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def gateway(redis_url, model_dir, tmp_path):
    settings = GatewaySettings(
        redis_url=redis_url, data_root=tmp_path, models=[str(model_dir)], allowed_hosts=["testserver"]
    )
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def run_worker(redis_url, tmp_path):
    clients: list[redis.Redis] = []

    def run() -> None:
        settings = WorkerSettings(
            redis_url=redis_url, cache_dir=tmp_path / "cache", data_root=tmp_path, poll_block_ms=50
        )
        runtime = ModelRuntime(
            cache_dir=settings.cache_dir, data_root=tmp_path, device="cpu", dtype="float32"
        )
        clients.append(redis.Redis.from_url(redis_url))
        Worker(settings, clients[-1], lambda job, ctx: run_job(job, runtime, ctx)).run(burst=True)

    yield run
    for c in clients:
        c.close()


def _submit(gateway: TestClient, model_dir: Path) -> str:
    body = {
        "model": str(model_dir),
        "forget": {"kind": "inline", "texts": CODE * 3},
        "retain": {"kind": "inline", "texts": PROSE * 3},
        "params": {"ff_frac": 0.1, "steps": 2, "collect_tokens": 200, "eval_tokens": 100, "token_limit": 32},
    }
    accepted = gateway.post("/v1/unlearn", json=body)
    assert accepted.status_code == 202, accepted.text
    job_id: str = accepted.json()["job_id"]
    return job_id


def test_prune_job_stores_a_plot_that_expires_with_the_job(gateway, run_worker, model_dir, redis_url):
    job_id = _submit(gateway, model_dir)
    assert gateway.get(f"/v1/jobs/{job_id}/plot").json()["error"]["type"] == "PlotNotReady"

    run_worker()

    assert gateway.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"
    resp = gateway.get(f"/v1/jobs/{job_id}/plot")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert resp.content.startswith(PNG_MAGIC)
    r = redis.Redis.from_url(redis_url)
    try:
        plot_ttl = r.ttl(keys.JOB_PLOT_KEY.format(job_id=job_id))
        steps_ttl = r.ttl(keys.JOB_STEPS_KEY.format(job_id=job_id))
    finally:
        r.close()
    assert plot_ttl > 0 and abs(plot_ttl - steps_ttl) <= 2


def test_a_failing_plot_never_fails_the_job(gateway, run_worker, model_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no plotting today")

    monkeypatch.setattr(plots, "render_job_plot", broken)
    job_id = _submit(gateway, model_dir)

    run_worker()

    job = gateway.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job.get("error")
    assert gateway.get(f"/v1/jobs/{job_id}/plot").json()["error"]["type"] == "PlotNotReady"
