"""Fair admission on the job lane with real workers: a tenant's backlog never delays another tenant's
next job, a reclaimed entry delivers the job it delivered before, and finished jobs leave no trace in
the admission records."""

from __future__ import annotations

import time

import pytest

from protocol import keys, scripts
from tests.integration.records import Jobs
from worker.loop import ensure_group

pytestmark = pytest.mark.redis


def payload() -> dict:
    return {
        "job_kind": "prune",
        "forget": {"kind": "inline", "texts": ["def f(): pass"]},
        "retain": {"kind": "inline", "texts": ["the cat sat"]},
    }


def test_another_tenants_job_starts_next_behind_a_backlog(client, make_worker):
    a, b = Jobs(client, "tenant-a"), Jobs(client, "tenant-b")
    ran: list[str] = []
    worker = make_worker(lambda job, ctx: ran.append(job.tenant) or {})
    a.enqueue(payload(), tenant="tenant-a", kind="prune")
    # A's first job runs; then A queues 20 more and B one: B's is the next to start.
    worker.run(burst=True)
    for _ in range(20):
        a.enqueue(payload(), tenant="tenant-a", kind="prune")
    b_id, _ = b.enqueue(payload(), tenant="tenant-b", kind="prune")
    worker.run(burst=True)
    assert ran[:2] == ["tenant-a", "tenant-b"] and len(ran) == 22
    assert b.get_job(b_id)["state"] == "succeeded"
    # Nothing is left behind: no queue, no waiting tenant, no entry mapping, no active job.
    assert client.xlen(keys.JOB_STREAM) == 0 and client.hlen(keys.ENTRY_JOBS_KEY) == 0
    assert client.zcard(keys.TENANTS_WAITING_KEY) == 0
    for tenant in ("tenant-a", "tenant-b"):
        assert client.llen(keys.TENANT_QUEUE_KEY.format(tenant=tenant)) == 0
        assert client.scard(keys.TENANT_ACTIVE_KEY.format(tenant=tenant)) == 0


def test_interleaves_tenants_with_equal_backlogs(client, make_worker):
    ran: list[str] = []
    for tenant in ("tenant-a", "tenant-b"):
        jobs = Jobs(client, tenant)
        for _ in range(3):
            jobs.enqueue(payload(), tenant=tenant, kind="prune")
    make_worker(lambda job, ctx: ran.append(job.tenant) or {}).run(burst=True)
    assert ran == ["tenant-a", "tenant-b"] * 3


def test_a_reclaimed_entry_delivers_the_job_it_delivered_before(client, make_worker):
    a, b = Jobs(client, "tenant-a"), Jobs(client, "tenant-b")
    a.enqueue(payload(), tenant="tenant-a", kind="prune")
    b.enqueue(payload(), tenant="tenant-b", kind="prune")
    # A worker takes an entry, is handed a job, and dies before running it (nothing acked).
    ensure_group(client)
    [[_, [(entry_id, _fields)]]] = client.xreadgroup(keys.JOB_GROUP, "dead", {keys.JOB_STREAM: ">"}, count=1)
    handed = scripts.call(client, scripts.claim_job(entry_id.decode(), now=time.time()))
    assert handed is not None
    time.sleep(0.1)  # idle past the visibility timeout
    ran: list[str] = []
    make_worker(lambda job, ctx: ran.append(job.job_id) or {}, visibility_timeout=0.05).run(burst=True)
    assert ran[0] == handed and len(set(ran)) == 2  # the reclaimed entry first, then the other job
    assert client.hlen(keys.ENTRY_JOBS_KEY) == 0 and client.xlen(keys.JOB_STREAM) == 0
