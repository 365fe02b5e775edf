"""The job hash layout: what writers encode, readers decode, and how a bad value is read."""

from __future__ import annotations

import json

import pytest

from protocol import ErrorInfo, JobProgress, JobState
from protocol.job_hash import JobHash, event_fields, job_fields, state_event


def test_a_job_round_trips_through_its_hash():
    job = JobHash(
        state=JobState.failed,
        kind="prune",
        tenant="t",
        payload={"job_id": "j", "job_kind": "prune", "name": "n"},
        created_at=1.5,
        started_at=2.25,
        finished_at=3.0,
        progress=JobProgress(phase="pruning", step=2, steps=5, tokens=7, tokens_total=9),
        attempts=2,
        worker="w1",
        result={"mask_id": "m"},
        error=ErrorInfo(type="ConfigError", message="bad"),
        cancel_requested=True,
    )
    raw = {k.encode(): v.encode() for k, v in job.encode().items()}  # as a bytes client returns it
    assert JobHash.decode(raw) == job
    assert job.mask_id == "m"


def test_values_are_stored_as_the_documented_strings():
    fields = job_fields(state=JobState.queued, created_at=1.5, attempts=0, cancel_requested=False)
    assert fields == {"state": "queued", "created_at": "1.5", "attempts": "0"}
    assert job_fields(cancel_requested=True, result=None) == {"cancel_requested": "1"}
    with pytest.raises(ValueError, match="no field 'color'"):
        job_fields(color="red")


def test_a_bad_value_reads_as_unset_and_hides_nothing_else(caplog):
    job = JobHash.decode(
        {
            "state": "exploded",
            "tenant": "t",
            "result": "{not json",
            "attempts": "x",
            "payload": '{"job_kind": "export"}',
        }
    )
    assert job is not None
    assert job.state is JobState.running  # unknown: not finished
    assert job.result is None and job.attempts == 0 and job.tenant == "t"
    assert job.kind == "export"  # no kind field: the payload's job_kind
    assert "does not parse" in caplog.text


def test_an_empty_hash_is_no_job():
    assert JobHash.decode({}) is None
    assert JobHash.read({"cancel_requested": None}).cancel_requested is False


def test_events_carry_a_name_and_json_data():
    data = json.loads(state_event("j", JobState.failed, ErrorInfo(type="E", message="m")))
    assert data == {"type": "state", "job_id": "j", "state": "failed", "error": {"type": "E", "message": "m"}}
    assert event_fields("progress", {"step": 1}) == {"event": "progress", "data": '{"step": 1}'}
