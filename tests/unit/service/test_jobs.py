"""GET/DELETE /v1/jobs: status read from the worker's hash layout, listing, cancel, server-sent events."""

from __future__ import annotations

import json
import threading
import time

import pytest

from protocol import keys
from tests.unit.service.helpers import assert_error, put_job

pytestmark = pytest.mark.redis

STEP0 = {
    "step": 0,
    "ff_selected": 0,
    "attn_selected": 0,
    "ff_pruned": 0,
    "attn_pruned": 0,
    "ff_per_layer": [0, 0],
    "attn_per_layer": [0, 0],
    "metrics": {
        "forget": {"top1": 0.5, "topk": 0.8, "loss": 2.0, "perplexity": 7.4, "ci": {"top1": [0.4, 0.6]}}
    },
    "seconds": 1.5,
}
STEP1 = STEP0 | {"step": 1, "ff_pruned": 12, "drops": {"forget": 0.3}, "mask_id": "m1"}


def test_status_of_a_finished_job(client, r):
    put_job(
        r,
        "a" * 32,
        "local",
        "succeeded",
        name="demo",
        progress={"phase": "done", "step": 1, "steps": 1, "tokens": 10, "tokens_total": 500},
        result={"mask_id": "m1", "steps": 1, "stopped_reason": "steps"},
    )
    r.rpush(keys.JOB_STEPS_KEY.format(job_id="a" * 32), json.dumps(STEP0), json.dumps(STEP1))
    s = client.get(f"/v1/jobs/{'a' * 32}").json()
    assert s["state"] == "succeeded" and s["mask_id"] == "m1" and s["name"] == "demo" and s["kind"] == "prune"
    assert (s["phase"], s["step"], s["steps"], s["tokens"], s["tokens_total"]) == ("done", 1, 1, 10, 500)
    assert [m["step"] for m in s["metrics"]] == [0, 1] and s["metrics"][1]["ff_pruned"] == 12
    forget = s["metrics"][0]["metrics"]["forget"]
    assert forget["top1"] == 0.5 and forget["topk"] == 0.8 and forget["ci"] == {"top1": [0.4, 0.6]}
    assert s["started_at"] < s["finished_at"] and s["result"]["stopped_reason"] == "steps"


def test_status_of_a_failed_job_carries_the_error(client, r):
    put_job(r, "b" * 32, "local", "failed", error={"type": "EmptyDatasetError", "message": "no text"})
    s = client.get(f"/v1/jobs/{'b' * 32}").json()
    assert s["state"] == "failed" and s["error"] == {"type": "EmptyDatasetError", "message": "no text"}


def test_unknown_job_is_404(client):
    assert_error(client.get(f"/v1/jobs/{'0' * 32}"), 404, "JobNotFound")
    assert_error(client.get("/v1/jobs/no:such:id"), 404, "JobNotFound")
    assert_error(client.delete(f"/v1/jobs/{'0' * 32}"), 404, "JobNotFound")


def test_list_newest_first_and_by_state(client, r):
    for i, state in enumerate(["succeeded", "failed", "succeeded"]):
        put_job(r, f"job{i}", "local", state)
        time.sleep(0.002)
    put_job(r, "other", "someone-else", "succeeded")
    jobs = client.get("/v1/jobs").json()["jobs"]
    assert [j["job_id"] for j in jobs] == ["job2", "job1", "job0"]
    done = client.get("/v1/jobs", params={"state": "succeeded", "limit": 1}).json()["jobs"]
    assert [j["job_id"] for j in done] == ["job2"]
    assert_error(client.get("/v1/jobs", params={"state": "sleeping"}), 422, "ValidationError", "state")


def test_cancel_queued_running_and_finished(client, r):
    queued = client.post(
        "/v1/unlearn",
        json={
            "forget": {"kind": "builtin", "name": "toxic"},
            "retain": {"kind": "builtin", "name": "english_prose"},
        },
    ).json()["job_id"]
    s = client.delete(f"/v1/jobs/{queued}").json()
    assert s["state"] == "cancelled" and s["cancel_requested"] is True and s["finished_at"] is not None
    events = r.xrange(keys.JOB_EVENTS_KEY.format(job_id=queued))
    assert events[-1][1][b"event"] == b"state" and json.loads(events[-1][1][b"data"])["state"] == "cancelled"

    put_job(r, "running1", "local", "running")
    s = client.delete("/v1/jobs/running1").json()
    assert s["state"] == "running" and s["cancel_requested"] is True  # the worker stops at its next check

    assert_error(client.delete(f"/v1/jobs/{queued}"), 409, "JobFinished", "cancelled")
    put_job(r, "done1", "local", "succeeded")
    assert_error(client.delete("/v1/jobs/done1"), 409, "JobFinished", "succeeded")


# Server-sent events -------------------------------------------------------------------------------
def parse_sse(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if fields:
            events.append(fields)
    return events


def add_event(r, job_id: str, event: str, data: dict) -> str:
    return r.xadd(
        keys.JOB_EVENTS_KEY.format(job_id=job_id), {"event": event, "data": json.dumps(data)}
    ).decode()


def test_events_stream_until_a_terminal_state_event(client, r):
    put_job(r, "j1", "local", "running")
    ids = [
        add_event(r, "j1", "state", {"state": "running"}),
        add_event(r, "j1", "progress", {"phase": "collecting_retain", "tokens": 100}),
        add_event(r, "j1", "step", {"step": 1, "ff_pruned": 12}),
        add_event(r, "j1", "state", {"state": "succeeded", "mask_id": "m1"}),
    ]
    add_event(r, "j1", "progress", {"after": "the end"})  # never sent: the stream ended before it
    resp = client.get("/v1/jobs/j1/events")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    assert [e["event"] for e in events] == ["state", "progress", "step", "state"]
    assert [e["id"] for e in events] == ids
    assert json.loads(events[2]["data"]) == {"step": 1, "ff_pruned": 12}

    resumed = parse_sse(client.get("/v1/jobs/j1/events", headers={"Last-Event-ID": ids[1]}).text)
    assert [e["id"] for e in resumed] == ids[2:]


def test_events_follow_a_live_job_and_end_when_its_hash_says_finished(client, r):
    put_job(r, "j2", "local", "running")
    add_event(r, "j2", "progress", {"tokens": 1})

    def worker() -> None:
        time.sleep(0.2)
        add_event(r, "j2", "progress", {"tokens": 2})
        time.sleep(0.2)
        r.hset(
            keys.JOB_KEY.format(job_id="j2"),
            mapping={"state": "failed", "error": json.dumps({"type": "X", "message": "boom"})},
        )

    thread = threading.Thread(target=worker)
    thread.start()
    with client.stream("GET", "/v1/jobs/j2/events") as resp:
        text = resp.read().decode()
    thread.join()
    events = parse_sse(text)
    assert [e["event"] for e in events] == ["progress", "progress", "state"]
    final = json.loads(events[-1]["data"])
    assert final["state"] == "failed" and final["error"]["message"] == "boom" and "id" not in events[-1]


def test_events_of_unknown_job_and_bad_last_event_id(client, r):
    assert_error(client.get("/v1/jobs/nope/events"), 404, "JobNotFound")
    put_job(r, "j3", "local", "succeeded")
    assert_error(client.get("/v1/jobs/j3/events", headers={"Last-Event-ID": "x"}), 422, "ValidationError")


def test_events_survive_a_quiet_job_longer_than_the_connect_timeout(make_client, r):
    """An XREAD BLOCK longer than 5 s must not time out (regression: the read timeout defaulted to
    the 5 s connect timeout and every quiet event stream broke)."""
    client = make_client(sse_block_ms=6000)
    put_job(r, "quiet", "local", "running")

    def finish_later() -> None:
        time.sleep(6.5)
        add_event(r, "quiet", "state", {"state": "succeeded"})
        r.hset(keys.JOB_KEY.format(job_id="quiet"), "state", "succeeded")

    thread = threading.Thread(target=finish_later)
    thread.start()
    with client.stream("GET", "/v1/jobs/quiet/events") as resp:
        text = resp.read().decode()
    thread.join()
    assert resp.status_code == 200
    assert [e["event"] for e in parse_sse(text)][-1] == "state"
