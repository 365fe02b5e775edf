"""The job queue on a real Redis: round trip, idempotency, crash recovery, leases, cancel, failures."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from protocol import JobProgress, keys
from selprune_core.errors import CancelledError, ConfigError
from selprune_core.masks import NeuronMask
from tests.integration.servers import wait_for
from worker.errors import LeaseLostError

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parents[2]
TENANT = "tenant-a"


def prune_payload(**extra):
    return {
        "job_kind": "prune",
        "forget": {"kind": "inline", "texts": ["def f(): pass"]},
        "retain": {"kind": "inline", "texts": ["the cat sat"]},
        **extra,
    }


def mask_after(step: int) -> NeuronMask:
    """The tiny mask a fake pruning run holds after `step` steps: the first `step` FF neurons pruned."""
    ff = torch.ones(2, 8, dtype=torch.bool)
    ff.view(-1)[:step] = False
    return NeuronMask("fp-test", ff, torch.ones(2, 8, dtype=torch.bool), 2)


def state_of(queue, job_id):
    job = queue.get_job(job_id)
    return job and job["state"]


def event_types(client, job_id):
    entries = client.xrange(keys.JOB_EVENTS_KEY.format(job_id=job_id))
    return [(f[b"event"].decode(), json.loads(f[b"data"])) for _, f in entries]


def pending_count(client) -> int:
    return client.xpending(keys.JOB_STREAM, keys.JOB_GROUP)["pending"]


def stepping_runner(n_steps: int = 4):
    """A job function that prunes step by step, resuming from ctx, and stores the final mask."""
    seen: dict = {}

    def run(job, ctx):
        done = ctx.completed_steps()
        checkpoint = ctx.checkpoint()
        seen["resumed_from"] = len(done)
        seen["checkpoint_id"] = NeuronMask.from_bytes(checkpoint).mask_id if checkpoint else None
        for step in range(len(done) + 1, n_steps + 1):
            ctx.progress(JobProgress(phase="pruning", step=step, steps=n_steps))
            ctx.step_done({"step": step, "ff_pruned": step}, mask_after(step).to_bytes())
        mask_id = ctx.store_mask(mask_after(n_steps).to_bytes(), {"name": "demo", "job_id": job.job_id})
        return {"mask_id": mask_id, "steps": n_steps, "resumed_from": len(done)}

    run.seen = seen
    return run


# Round trip --------------------------------------------------------------------------------------
def test_enqueue_run_succeeds_with_progress_steps_and_events(queue, masks, client, make_worker):
    job_id, created = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune")
    assert created
    job = queue.get_job(job_id)
    assert job["state"] == "queued" and job["attempts"] == 0 and job["progress"]["phase"] == "queued"
    assert job["payload"]["job_id"] == job_id and job["payload"]["tenant"] == TENANT
    assert client.zscore(keys.TENANT_JOBS_KEY.format(tenant=TENANT), job_id) is not None
    assert client.zscore(keys.ALL_JOBS_KEY, job_id) is not None

    worker = make_worker(stepping_runner(2), job_ttl_seconds=3600)
    worker.run(burst=True)

    job = queue.get_job(job_id)
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 1 and job["worker"] == worker.id
    assert job["result"] == {"mask_id": mask_after(2).mask_id, "steps": 2, "resumed_from": 0}
    assert job["progress"]["step"] == 2 and job["progress"]["phase"] == "pruning"
    assert float(job["finished_at"]) >= float(job["started_at"]) >= float(job["created_at"])
    assert queue.steps(job_id) == [{"step": 1, "ff_pruned": 1}, {"step": 2, "ff_pruned": 2}]
    events = event_types(client, job_id)
    names = [name for name, _ in events]
    assert names[0] == "state" and events[0][1]["state"] == "running"
    assert names.count("step") == 2 and "progress" in names
    assert events[-1] == ("state", {"type": "state", "job_id": job_id, "state": "succeeded"})
    # Finished: acked and removed from the stream, keys expire, checkpoint dropped, lease released.
    assert client.xlen(keys.JOB_STREAM) == 0 and pending_count(client) == 0
    assert 0 < client.ttl(keys.JOB_KEY.format(job_id=job_id)) <= 3600
    assert 0 < client.ttl(keys.JOB_STEPS_KEY.format(job_id=job_id)) <= 3600
    assert not client.exists(keys.JOB_CHECKPOINT_KEY.format(job_id=job_id))
    assert not client.exists(keys.JOB_LEASE_KEY.format(job_id=job_id))
    assert client.llen(keys.JOB_DURATIONS_KEY) == 1 and client.llen(keys.STEP_DURATIONS_KEY) == 2
    assert not client.exists(keys.WORKER_HEARTBEAT_KEY.format(worker_id=worker.id))
    assert masks.get_meta(mask_after(2).mask_id, TENANT)["job_id"] == job_id


def test_idempotency_key_returns_the_first_job(queue, client):
    first, created1 = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune", idempotency_key="k1")
    again, created2 = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune", idempotency_key="k1")
    other, created3 = queue.enqueue(prune_payload(), tenant="tenant-b", kind="prune", idempotency_key="k1")
    assert (again, created1, created2, created3) == (first, True, False, True)
    assert other != first
    assert client.xlen(keys.JOB_STREAM) == 2


def test_enqueue_rejects_a_payload_for_another_tenant(queue):
    with pytest.raises(ValueError):
        queue.enqueue(prune_payload(tenant="someone-else"), tenant=TENANT, kind="prune")


# Crash recovery ----------------------------------------------------------------------------------
DOOMED_WORKER = textwrap.dedent(
    """
    import sys, time
    import redis, torch
    from selprune_core.masks import NeuronMask
    from worker.consumer import Worker
    from worker.settings import WorkerSettings

    def mask_after(step):
        ff = torch.ones(2, 8, dtype=torch.bool)
        ff.view(-1)[:step] = False
        return NeuronMask("fp-test", ff, torch.ones(2, 8, dtype=torch.bool), 2)

    def runner(job, ctx):
        for step in (1, 2):
            ctx.step_done({"step": step, "ff_pruned": step}, mask_after(step).to_bytes())
        time.sleep(600)  # "working" on step 3 when the test kills us

    settings = WorkerSettings(redis_url=sys.argv[1], worker_id="doomed",
                              lease_seconds=1.0, visibility_timeout=1.0, poll_block_ms=50)
    Worker(settings, redis.Redis.from_url(sys.argv[1]), runner).run()
    """
)


def test_killed_worker_job_is_reclaimed_and_resumes_from_checkpoint(
    queue, masks, client, redis_url, start_worker
):
    job_id, _ = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune")
    doomed = subprocess.Popen([sys.executable, "-c", DOOMED_WORKER, redis_url], cwd=REPO)
    try:
        wait_for(lambda: client.llen(keys.JOB_STEPS_KEY.format(job_id=job_id)) == 2, timeout=60)
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    assert state_of(queue, job_id) == "running"

    runner = stepping_runner(4)
    start_worker(runner)
    wait_for(lambda: state_of(queue, job_id) == "succeeded")

    job = queue.get_job(job_id)
    assert job["attempts"] == 2 and job["result"]["resumed_from"] == 2
    assert runner.seen == {"resumed_from": 2, "checkpoint_id": mask_after(2).mask_id}
    assert [s["step"] for s in queue.steps(job_id)] == [1, 2, 3, 4]
    succeeded = [
        d for name, d in event_types(client, job_id) if name == "state" and d["state"] == "succeeded"
    ]
    assert len(succeeded) == 1 and client.llen(keys.JOB_DURATIONS_KEY) == 1
    held = masks.list(TENANT)
    assert [m["mask_id"] for m in held] == [mask_after(4).mask_id] == [job["result"]["mask_id"]]
    assert pending_count(client) == 0 and client.llen(keys.DEAD_LETTER_KEY) == 0


# Leases ------------------------------------------------------------------------------------------
def test_two_workers_never_run_the_same_job(queue, client, start_worker, caplog):
    caplog.set_level(logging.DEBUG, logger="worker.consumer")
    job_id, _ = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune")

    def slow_runner(job, ctx):
        client.incr(f"test:runs:{job.job_id}")
        time.sleep(1.5)
        return {"ok": True}

    # The entry idles past the visibility timeout between heartbeats, so the idle worker keeps
    # claiming it; only the lease keeps it from running the job a second time.
    for _ in range(2):
        start_worker(slow_runner, lease_seconds=3.0, visibility_timeout=0.2)
    wait_for(lambda: state_of(queue, job_id) == "succeeded")
    time.sleep(0.5)
    assert int(client.get(f"test:runs:{job_id}")) == 1
    assert queue.get_job(job_id)["attempts"] == 1
    assert any("leaving it" in r.getMessage() for r in caplog.records)  # the other one did try


def test_entry_leased_by_a_live_worker_is_left_alone(queue, client, make_worker):
    job_id, _ = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune")
    client.set(keys.JOB_LEASE_KEY.format(job_id=job_id), "other-worker:token", px=30_000)
    calls = []
    make_worker(lambda job, ctx: calls.append(job) or {}).run(burst=True)
    assert calls == [] and state_of(queue, job_id) == "queued"
    assert pending_count(client) == 1  # still there for whoever holds the lease
    assert queue.get_job(job_id)["attempts"] == 0


def test_fenced_off_worker_writes_nothing(queue, masks, client, make_worker):
    job_id, _ = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune")
    lease_key = keys.JOB_LEASE_KEY.format(job_id=job_id)
    seen = {}

    def stalled_runner(job, ctx):
        client.set(lease_key, "new-holder:token", px=30_000)  # we stalled; another worker took over
        seen["fenced"] = wait_for(ctx.should_cancel, timeout=5)  # the heartbeat notices
        with pytest.raises(LeaseLostError):
            ctx.step_done({"step": 1}, mask_after(1).to_bytes())
        with pytest.raises(LeaseLostError):
            ctx.store_mask(mask_after(1).to_bytes(), {})
        return {"ok": True}

    make_worker(stalled_runner, lease_seconds=0.3).run(burst=True)
    job = queue.get_job(job_id)
    assert seen["fenced"] and job["state"] == "running" and "result" not in job
    assert queue.steps(job_id) == [] and pending_count(client) == 1 and masks.list(TENANT) == []
    assert client.get(lease_key) == b"new-holder:token"


# Cancellation ------------------------------------------------------------------------------------
def test_cancelled_queued_job_never_runs(queue, client, make_worker):
    job_id, _ = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune")
    assert queue.request_cancel(job_id) == "cancelled"
    assert queue.request_cancel(job_id) == "cancelled"
    assert queue.request_cancel("no-such-job") is None
    calls = []
    make_worker(lambda job, ctx: calls.append(job) or {}).run(burst=True)
    assert calls == [] and state_of(queue, job_id) == "cancelled"
    assert client.xlen(keys.JOB_STREAM) == 0 and pending_count(client) == 0
    assert ("state", {"type": "state", "job_id": job_id, "state": "cancelled"}) in event_types(client, job_id)


def test_cancelled_running_job_stops(queue, client, start_worker):
    job_id, _ = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune")
    started = threading.Event()

    def patient_runner(job, ctx):
        started.set()
        deadline = time.monotonic() + 10
        while not ctx.should_cancel():
            assert time.monotonic() < deadline, "cancel never seen"
            time.sleep(0.02)
        raise CancelledError("stopped between steps")

    start_worker(patient_runner)
    assert started.wait(10)
    assert queue.request_cancel(job_id) == "running"
    wait_for(lambda: state_of(queue, job_id) == "cancelled")
    assert "error" not in queue.get_job(job_id) and pending_count(client) == 0


# Failures are data -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (ConfigError("bad"), {"type": "ConfigError", "message": "bad"}),
        (RuntimeError("boom"), {"type": "RuntimeError", "message": "boom"}),
    ],
)
def test_failed_job_stores_its_error_and_is_not_retried(queue, client, make_worker, exc, error):
    job_id, _ = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune")
    calls = []

    def failing_runner(job, ctx):
        calls.append(job.job_id)
        raise exc

    make_worker(failing_runner, visibility_timeout=0.05).run(burst=True)
    time.sleep(0.1)
    make_worker(failing_runner, visibility_timeout=0.05).run(burst=True)
    job = queue.get_job(job_id)
    assert job["state"] == "failed" and job["error"] == error and job["attempts"] == 1
    assert calls == [job_id] and pending_count(client) == 0
    assert client.llen(keys.DEAD_LETTER_KEY) == 0


def test_invalid_payload_fails_without_running(queue, make_worker):
    job_id, _ = queue.enqueue({"job_kind": "prune", "forget": "nope"}, tenant=TENANT, kind="prune")
    calls = []
    make_worker(lambda job, ctx: calls.append(job) or {}).run(burst=True)
    job = queue.get_job(job_id)
    assert calls == [] and job["state"] == "failed" and job["error"]["type"] == "JobPayloadError"


class WorkerDies(BaseException):
    """Stands in for the process dying mid-job: nothing below the runner catches it."""


def test_job_that_kills_its_worker_is_dead_lettered_after_max_attempts(queue, client, make_worker):
    job_id, _ = queue.enqueue(prune_payload(), tenant=TENANT, kind="prune")
    calls = []

    def deadly_runner(job, ctx):
        calls.append(job.job_id)
        raise WorkerDies

    for _ in range(2):
        with pytest.raises(WorkerDies):
            make_worker(deadly_runner, max_attempts=2, visibility_timeout=0.05).run(burst=True)
        assert state_of(queue, job_id) == "running"
        time.sleep(0.1)  # the entry idles past the visibility timeout
    make_worker(deadly_runner, max_attempts=2, visibility_timeout=0.05).run(burst=True)

    job = queue.get_job(job_id)
    assert len(calls) == 2 and job["state"] == "failed" and job["attempts"] == 2
    assert job["error"]["type"] == "RetriesExhausted"
    assert client.lrange(keys.DEAD_LETTER_KEY, 0, -1) == [job_id.encode()]
    assert pending_count(client) == 0


# The real job function ---------------------------------------------------------------------------
def test_real_prune_job_on_a_tiny_model(queue, masks, client, make_worker, tiny_model, tokenizer, tmp_path):
    """worker.jobs.run_job through the queue: steps, checkpoint and the final mask land in Redis."""
    from tests.helpers import CORPUS
    from worker.jobs import run_job
    from worker.runtime import ModelRuntime

    model_dir = tmp_path / "tiny-gpt2"
    tiny_model("gpt2").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    runtime = ModelRuntime(cache_dir=tmp_path / "cache", data_root=tmp_path, device="cpu", dtype="float32")
    params = {"steps": 2, "collect_tokens": 200, "eval_tokens": 100, "token_limit": 32, "batch_size": 4}
    job_id, _ = queue.enqueue(
        prune_payload(
            model=str(model_dir),
            forget={"kind": "inline", "texts": CORPUS[1::2] * 4},
            retain={"kind": "inline", "texts": CORPUS[0::2] * 4},
            params=params,
        ),
        tenant=TENANT,
        kind="prune",
    )
    make_worker(lambda job, ctx: run_job(job, runtime, ctx, export_root=tmp_path)).run(burst=True)

    job = queue.get_job(job_id)
    assert job["state"] == "succeeded", job.get("error")
    assert job["result"]["steps"] == 2 and len(queue.steps(job_id)) == 3  # step 0 (baseline), 1, 2
    mask = NeuronMask.from_bytes(masks.get_bytes(job["result"]["mask_id"], TENANT))
    assert mask.pruned_counts()["ff"] == job["result"]["pruned"]["ff"] > 0
