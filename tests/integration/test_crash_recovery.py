"""Crash recovery under repeated kill -9, and a Redis restart with AOF mid-queue.

Workers here are real `worker.consumer.Worker` processes; the job function is a resumable stepping
runner (the seam the tests own), which stores one mask per job at the end.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import redis

from protocol import keys
from selprune.local_stack import free_port
from tests.integration.records import Jobs, Masks
from tests.integration.servers import valkey_with_aof, wait_for

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parents[2]
TENANT = "tenant-a"
STEPS = 6

WORKER = textwrap.dedent(
    f"""
    import sys, time
    import redis, torch
    from selprune_core.masks import NeuronMask
    from worker.consumer import Worker
    from worker.settings import WorkerSettings

    def mask_for(job_id, step):
        ff = torch.ones(2, 8, dtype=torch.bool)
        ff.view(-1)[:step] = False
        return NeuronMask("fp-" + job_id, ff, torch.ones(2, 8, dtype=torch.bool), 2)

    def runner(job, ctx):
        done = len(ctx.completed_steps())
        for step in range(done + 1, {STEPS} + 1):
            time.sleep(0.05)
            ctx.step_done({{"step": step}}, mask_for(job.job_id, step).to_bytes())
        mask_id = ctx.store_mask(mask_for(job.job_id, {STEPS}).to_bytes(), {{"job_id": job.job_id}})
        return {{"mask_id": mask_id}}

    settings = WorkerSettings(redis_url=sys.argv[1], worker_id=sys.argv[2], lease_seconds=0.6,
                              visibility_timeout=0.6, poll_block_ms=50, max_attempts=50)
    Worker(settings, redis.Redis.from_url(sys.argv[1]), runner).run()
    """
)


def payload() -> dict:
    return {
        "job_kind": "prune",
        "forget": {"kind": "inline", "texts": ["def f(): pass"]},
        "retain": {"kind": "inline", "texts": ["the cat sat"]},
    }


def start_worker(redis_url: str, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", WORKER, redis_url, name], cwd=REPO)


def total_steps(client: redis.Redis, job_ids: list[str]) -> int:
    return sum(client.llen(keys.JOB_STEPS_KEY.format(job_id=j)) for j in job_ids)


def assert_every_job_done_once(client: redis.Redis, redis_url: str, job_ids: list[str]) -> None:
    jobs = Jobs(client, TENANT)
    records = {j: jobs.get_job(j) for j in job_ids}
    assert all(r is not None and r["state"] == "succeeded" for r in records.values()), records
    for job_id in job_ids:
        assert [s["step"] for s in jobs.steps(job_id)] == list(range(1, STEPS + 1))  # none lost or doubled
    held = Masks(client, redis_url).list(TENANT)
    assert sorted(m["job_id"] for m in held) == sorted(job_ids)  # exactly one mask per job
    assert {m["mask_id"] for m in held} == {r["result"]["mask_id"] for r in records.values()}
    assert client.llen(keys.DEAD_LETTER_KEY) == 0 and client.xlen(keys.JOB_STREAM) == 0


def test_ten_kills_lose_no_job_double_no_step_and_store_one_mask_per_job(client, redis_url):
    jobs = Jobs(client, TENANT)
    job_ids = [jobs.enqueue(payload(), tenant=TENANT, kind="prune")[0] for _ in range(4)]
    for kill in range(10):
        before = total_steps(client, job_ids)
        worker = start_worker(redis_url, f"doomed-{kill}")
        try:
            wait_for(lambda b=before: total_steps(client, job_ids) > b, 90)
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
    survivor = start_worker(redis_url, "survivor")
    try:
        wait_for(lambda: all(Jobs(client, TENANT).get_job(j)["state"] == "succeeded" for j in job_ids), 180)
    finally:
        survivor.terminate()
        survivor.wait(30)
    assert_every_job_done_once(client, redis_url, job_ids)


def test_a_redis_restart_with_aof_mid_queue_loses_no_job_and_no_mask():
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with tempfile.TemporaryDirectory() as data_dir:
        server = valkey_with_aof(port, data_dir)
        client = redis.Redis.from_url(url)
        try:
            jobs = Jobs(client, TENANT)
            job_ids = [jobs.enqueue(payload(), tenant=TENANT, kind="prune")[0] for _ in range(3)]
            worker = start_worker(url, "before-restart")  # finishes some, is mid-way through another
            try:
                wait_for(lambda: total_steps(client, job_ids) >= STEPS + 2, 90)
            finally:
                worker.send_signal(signal.SIGKILL)
                worker.wait(10)
            server.send_signal(signal.SIGKILL)  # no shutdown save: only the append-only file is left
            server.wait(10)
            client.close()

            server = valkey_with_aof(port, data_dir)
            client = redis.Redis.from_url(url)
            survivor = start_worker(url, "after-restart")
            try:
                wait_for(
                    lambda: all(Jobs(client, TENANT).get_job(j)["state"] == "succeeded" for j in job_ids)
                )
            finally:
                survivor.terminate()
                survivor.wait(30)
            assert_every_job_done_once(client, url, job_ids)
        finally:
            client.close()
            server.terminate()
            server.wait(10)
