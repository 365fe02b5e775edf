"""Property-based fuzzing of the whole HTTP API (bench/fuzz.py), briefly: no generated request, valid or
schema-breaking, gets a response of 500 or above. The gateway runs in-process on the test Redis with a
real serving loop on the tiny model, so generation requests are answered, not timed out."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis

from bench.fuzz import asgi_session, fuzz
from service.main import create_app
from service.settings import GatewaySettings
from tests.integration.servers import serving_thread
from tests.unit.service.helpers import KEY_A, KEY_B
from worker.runtime import ModelRuntime

pytestmark = pytest.mark.redis

# Per operation; about 900 requests, under a minute on 2 cores. SELPRUNE_FUZZ_EXAMPLES runs longer.
EXAMPLES = int(os.environ.get("SELPRUNE_FUZZ_EXAMPLES", "60"))


@pytest.fixture
def serving(redis_url, make_settings, model_dir, tmp_path) -> Iterator[None]:
    settings = make_settings(serve_batch_window_ms=5, poll_block_ms=50)
    runtime = ModelRuntime(cache_dir=tmp_path / "cache", data_root=tmp_path, device="cpu", dtype="float32")
    runtime.model(str(model_dir))
    with serving_thread(settings, redis_url, runtime):
        yield


def test_no_generated_request_gets_a_5xx(redis_url, model_dir, tmp_path, serving):
    settings = GatewaySettings(
        redis_url=redis_url,
        data_root=tmp_path,
        models=[str(model_dir)],
        api_keys=f"{KEY_A},{KEY_B}",
        max_new_tokens=8,
        generate_timeout_s=30,
        sse_block_ms=50,
    )
    app = create_app(settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    with asgi_session(app, {"Authorization": f"Bearer {KEY_A}"}) as session:
        report = fuzz(schema, session, examples=EXAMPLES, seed=0)
    print(report.line())
    assert report.requests > 100, report.line()
    assert report.server_errors == [], report.server_errors[:5]
