"""Job failures are bounded and clear, on a real Redis: the per-job wall-clock limit, Redis outages that
do not use up attempts, a lost checkpoint that fails the job instead of restarting it unpruned, and
exports that appear whole, only while the lease holds, under a name relative to the export root."""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from protocol import JobProgress, keys
from selprune.local_stack import free_port
from selprune_core.errors import CancelledError
from selprune_core.masks import NeuronMask
from tests.helpers import CORPUS
from tests.integration.conftest import WorkerThread
from tests.integration.records import Jobs
from tests.integration.servers import valkey_with_aof, wait_for
from worker.consumer import Worker
from worker.jobs import run_job
from worker.runtime import ModelRuntime

pytestmark = pytest.mark.redis

TENANT = "tenant-a"
TINY_PARAMS = {"steps": 2, "collect_tokens": 200, "eval_tokens": 100, "token_limit": 32, "batch_size": 4}


def prune_payload(**extra):
    return {
        "job_kind": "prune",
        "forget": {"kind": "inline", "texts": ["def f(): pass"]},
        "retain": {"kind": "inline", "texts": ["the cat sat"]},
        **extra,
    }


def tiny_prune_payload(model_dir: Path, **params) -> dict:
    return prune_payload(
        model=str(model_dir),
        forget={"kind": "inline", "texts": CORPUS[1::2] * 4},
        retain={"kind": "inline", "texts": CORPUS[0::2] * 4},
        params=TINY_PARAMS | params,
    )


def state_of(queue, job_id):
    job = queue.get_job(job_id)
    return job and job["state"]


@pytest.fixture
def runtime(tmp_path: Path) -> ModelRuntime:
    return ModelRuntime(cache_dir=tmp_path / "cache", data_root=tmp_path, device="cpu", dtype="float32")


# Wall-clock limit --------------------------------------------------------------------------------
def test_a_job_past_its_time_limit_fails_as_job_timeout(queue, client, make_worker):
    job_id, _ = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune")

    def endless_runner(job, ctx):  # a job that would run for 10 s, checking between batches as the core does
        ctx.progress(JobProgress(phase="collecting_forget", step=1, steps=5))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if ctx.should_cancel():
                raise CancelledError("stopped between batches")
            time.sleep(0.02)
        return {"ok": True}

    t0 = time.monotonic()
    make_worker(endless_runner, job_timeout_s=0.3).run(burst=True)
    assert time.monotonic() - t0 < 5

    job = queue.get_job(job_id)
    assert job["state"] == "failed" and job["error"]["type"] == "JobTimeout", job
    message = job["error"]["message"]
    assert "0.3 s" in message and "SELPRUNE_JOB_TIMEOUT_S" in message and "collecting_forget" in message
    assert job["attempts"] == 1 and client.llen(keys.DEAD_LETTER_KEY) == 0
    assert client.xlen(keys.JOB_STREAM) == 0  # failed and acked: not retried


def test_a_real_prune_job_stops_at_its_time_limit(queue, make_worker, model_dir, runtime, tmp_path):
    job_id, _ = queue.enqueue(tiny_prune_payload(model_dir, steps=50), tenant=TENANT, kind="prune")
    runner = lambda job, ctx: run_job(job, runtime, ctx, export_root=tmp_path)  # noqa: E731
    make_worker(runner, job_timeout_s=0.5).run(burst=True)
    job = queue.get_job(job_id)
    assert job["state"] == "failed" and job["error"]["type"] == "JobTimeout", job
    assert len(queue.steps(job_id)) < 51


def test_a_cancel_before_the_time_limit_is_still_a_cancel(queue, start_worker):
    job_id, _ = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune")
    started = threading.Event()

    def patient_runner(job, ctx):
        started.set()
        while not ctx.should_cancel():
            time.sleep(0.02)
        raise CancelledError("stopped")

    start_worker(patient_runner, job_timeout_s=60)
    assert started.wait(10)
    queue.request_cancel(job_id)
    wait_for(lambda: state_of(queue, job_id) == "cancelled")
    assert "error" not in queue.get_job(job_id)


# Attempts and Redis outages ----------------------------------------------------------------------
def test_a_redis_error_mid_job_does_not_use_up_an_attempt(queue, client, start_worker):
    job_id, _ = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune")
    calls: list[int] = []

    def blipping_runner(job, ctx):
        calls.append(queue.get_job(job.job_id)["attempts"])
        if len(calls) < 3:  # Redis went away under the job twice
            raise redis.ConnectionError("Connection reset by peer")
        return {"ok": True}

    # One attempt allowed: before, the second start was already "RetriesExhausted".
    start_worker(blipping_runner, max_attempts=1, visibility_timeout=0.2)
    wait_for(lambda: state_of(queue, job_id) in ("succeeded", "failed"))
    job = queue.get_job(job_id)
    assert job["state"] == "succeeded", job
    assert calls == [1, 1, 1] and job["attempts"] == 1
    assert client.llen(keys.DEAD_LETTER_KEY) == 0


def test_a_redis_restart_mid_job_gives_the_attempt_back(make_settings):
    """A real outage: the server is killed while the job reports progress, and restarted from its
    append-only file. The worker's client does not retry, so the job sees the ConnectionError."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with tempfile.TemporaryDirectory() as data_dir:
        server = valkey_with_aof(port, data_dir)
        client = redis.Redis.from_url(url)
        worker_client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
        outage = threading.Event()
        calls: list[int] = []

        def runner(job, ctx):
            calls.append(len(calls) + 1)
            if len(calls) == 1:
                outage.set()
                while True:  # reports progress until the server goes away under it
                    ctx.progress(JobProgress(phase="collecting_forget"))
                    time.sleep(0.02)
            return {"ok": True}

        settings = make_settings(redis_url=url, max_attempts=1, lease_seconds=6.0, visibility_timeout=0.5)
        worker = WorkerThread(Worker(settings, worker_client, runner))
        try:
            jobs = Jobs(client, TENANT)
            job_id, _ = jobs.enqueue(prune_payload(), tenant=TENANT, kind="prune")
            worker.thread.start()
            assert outage.wait(30)
            server.send_signal(signal.SIGKILL)
            server.wait(10)
            client.close()
            time.sleep(0.5)
            server = valkey_with_aof(port, data_dir)
            client = redis.Redis.from_url(url)
            jobs = Jobs(client, TENANT)
            wait_for(lambda: state_of(jobs, job_id) in ("succeeded", "failed"), timeout=60)
            job = jobs.get_job(job_id)
            assert job["state"] == "succeeded", job
            assert calls == [1, 2] and job["attempts"] == 1
        finally:
            worker.stop()
            worker_client.close()
            client.close()
            server.terminate()
            server.wait(10)
        assert worker.error is None


# Checkpoints -------------------------------------------------------------------------------------
def test_a_missing_checkpoint_with_recorded_steps_fails_the_job(
    queue, client, make_worker, model_dir, runtime, tmp_path
):
    runner = lambda job, ctx: run_job(job, runtime, ctx, export_root=tmp_path)  # noqa: E731
    done_id, _ = queue.enqueue(tiny_prune_payload(model_dir, steps=1), tenant=TENANT, kind="prune")
    make_worker(runner).run(burst=True)
    assert state_of(queue, done_id) == "succeeded"
    reports = client.lrange(keys.JOB_STEPS_KEY.format(job_id=done_id), 0, -1)  # steps 0 and 1, for real

    # A job interrupted after step 1 whose checkpoint is gone (evicted, deleted by hand).
    job_id, _ = queue.enqueue(tiny_prune_payload(model_dir, steps=3), tenant=TENANT, kind="prune")
    client.rpush(keys.JOB_STEPS_KEY.format(job_id=job_id), *reports)
    make_worker(runner).run(burst=True)

    job = queue.get_job(job_id)
    assert job["state"] == "failed" and job["error"]["type"] == "CheckpointMissingError", job
    assert "step 1" in job["error"]["message"] and "Submit the job again" in job["error"]["message"]
    assert len(queue.steps(job_id)) == 2  # nothing was pruned on top of an unpruned model
    assert client.xlen(keys.JOB_STREAM) == 0 and client.llen(keys.DEAD_LETTER_KEY) == 0


# Exports -----------------------------------------------------------------------------------------
@pytest.fixture
def tiny_mask(masks, model_dir, runtime) -> str:
    loaded = runtime.model(str(model_dir))
    mask = NeuronMask.full(loaded.sites, loaded.fingerprint)
    mask.ff_keep[0, :8] = False
    return masks.put(mask.to_bytes(), {"model": str(model_dir)}, TENANT)


def export_payload(mask_id: str, model_dir: Path) -> dict:
    return {"job_kind": "export", "mask_id": mask_id, "model": str(model_dir)}


def test_an_export_lands_whole_under_a_relative_name(
    queue, make_worker, model_dir, runtime, tmp_path, tiny_mask
):
    root = tmp_path / "exports"
    (root / tiny_mask).mkdir(parents=True)
    (root / tiny_mask / "stale.bin").write_bytes(b"an earlier export")
    job_id, _ = queue.enqueue(export_payload(tiny_mask, model_dir), tenant=TENANT, kind="export")
    make_worker(lambda job, ctx: run_job(job, runtime, ctx, export_root=root)).run(burst=True)

    job = queue.get_job(job_id)
    assert job["state"] == "succeeded", job.get("error")
    assert job["result"]["path"] == tiny_mask  # relative to the export root, never a server path
    assert str(root) not in str(job["result"])  # (its model is a folder here: the caller's own name)
    folder = root / job["result"]["path"]
    assert (folder / "config.json").is_file() and not (folder / "stale.bin").exists()
    assert sorted(p.name for p in root.iterdir()) == [tiny_mask]  # no staging or old folder left behind
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(folder)
    assert (exported.model.layers[0].mlp.down_proj.weight[:, :8] == 0).all()


def test_a_fenced_off_export_leaves_the_target_alone(
    queue, client, make_worker, model_dir, runtime, tmp_path, tiny_mask
):
    root = tmp_path / "exports"
    (root / tiny_mask).mkdir(parents=True)
    (root / tiny_mask / "config.json").write_text('{"written_by": "the new holder"}')
    job_id, _ = queue.enqueue(export_payload(tiny_mask, model_dir), tenant=TENANT, kind="export")
    lease_key = keys.JOB_LEASE_KEY.format(job_id=job_id)

    def stalled_export(job, ctx):
        # We stalled; another worker took the job over. The heartbeat (every 10 s) has not noticed yet.
        client.set(lease_key, "new-holder:token", px=30_000)
        return run_job(job, runtime, ctx, export_root=root)

    make_worker(stalled_export, lease_seconds=30.0).run(burst=True)

    job = queue.get_job(job_id)
    assert job["state"] == "running" and "result" not in job  # fenced off: nothing written
    assert (root / tiny_mask / "config.json").read_text() == '{"written_by": "the new holder"}'
    assert sorted(p.name for p in root.iterdir()) == [tiny_mask]  # the staged checkpoint is gone
    assert client.get(lease_key) == b"new-holder:token"
