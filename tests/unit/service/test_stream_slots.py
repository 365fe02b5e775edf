"""Event streams are bounded per tenant: a tenant holding its cap of open streams gets 429, a stream
ends after its lifetime, and its slot comes back however it ends."""

from __future__ import annotations

from tests.unit.service.helpers import assert_error, put_job


def test_a_tenant_at_its_stream_cap_gets_429(make_client, r):
    client = make_client(max_event_streams_per_tenant=1)
    put_job(r, "live", "local", "running")
    slots = client.app.state.stream_slots
    slots.take("local")  # a stream this tenant already holds open
    refused = client.get("/v1/jobs/live/events")
    assert_error(refused, 429, "TooManyStreams", "1 event streams")
    assert refused.headers["retry-after"] == "5"
    assert slots.open("local") == 1
    slots.give_back("local")


def test_a_stream_ends_after_its_lifetime_and_gives_its_slot_back(make_client, r):
    client = make_client(max_event_streams_per_tenant=1, event_stream_max_s=0.3, sse_block_ms=50)
    put_job(r, "live", "local", "running")  # never finishes: only the lifetime ends the stream
    for _ in range(2):  # the second stream gets the slot the first gave back
        with client.stream("GET", "/v1/jobs/live/events") as resp:
            text = resp.read().decode()
        assert resp.status_code == 200 and ": keep-alive" in text
    assert client.app.state.stream_slots.open("local") == 0
