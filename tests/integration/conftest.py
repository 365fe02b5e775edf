"""Integration fixtures: a bytes Redis client on the test server, worker settings and a worker factory.

Workers here are the real `worker.consumer.Worker`; jobs are enqueued, cancelled and read with the
production code (tests/integration/records.py); only the job function (the runner) is the test's
own, which is a seam we own. Threaded workers are stopped and joined at teardown, and an exception
in one fails the test.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import GatewaySettings
from tests.integration.records import Jobs, Masks
from worker.consumer import Runner, Worker
from worker.settings import WorkerSettings

# Short timings so crash recovery and lease expiry take about a second, not a minute.
FAST = dict(lease_seconds=1.0, visibility_timeout=1.0, poll_block_ms=50, max_attempts=3)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def queue(client: redis.Redis) -> Jobs:
    """Jobs of "tenant-a" (the tenant the queue tests use)."""
    return Jobs(client, tenant="tenant-a")


@pytest.fixture
def masks(client: redis.Redis, redis_url: str) -> Masks:
    return Masks(client, redis_url)


@pytest.fixture
def make_settings(redis_url: str) -> Callable[..., WorkerSettings]:
    """Factory: WorkerSettings on the test Redis with FAST timings, overridable per call."""

    def make(**overrides: Any) -> WorkerSettings:
        fields: dict[str, Any] = {"redis_url": redis_url, "worker_id": f"w-{uuid.uuid4().hex[:6]}", **FAST}
        return WorkerSettings(**{**fields, **overrides})

    return make


class WorkerThread:
    """A worker looping (not burst) in a thread until stopped."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"worker-{worker.id}", daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run(stop_event=self.stop_event)
        except BaseException as exc:  # reported at teardown
            self.error = exc

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"worker {self.worker.id} did not stop"


@pytest.fixture
def make_worker(
    make_settings: Callable[..., WorkerSettings], redis_url: str
) -> Iterator[Callable[..., Worker]]:
    """Factory: a Worker with its own client; every client made here is closed at teardown."""
    clients: list[redis.Redis] = []

    def make(runner: Runner, **overrides: Any) -> Worker:
        c = redis.Redis.from_url(redis_url)
        clients.append(c)
        return Worker(make_settings(**overrides), c, runner)

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def start_worker(make_worker: Callable[..., Worker]) -> Iterator[Callable[..., WorkerThread]]:
    """Factory: a Worker running in a thread; all are stopped and checked at teardown."""
    started: list[WorkerThread] = []

    def start(runner: Runner, **overrides: Any) -> WorkerThread:
        wt = WorkerThread(make_worker(runner, **overrides))
        started.append(wt)
        wt.thread.start()
        return wt

    yield start
    for wt in started:
        wt.stop()
    errors = [wt.error for wt in started if wt.error is not None]
    if errors:
        raise errors[0]


@pytest.fixture
def gateway(redis_url: str, model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    """The real gateway app on the test Redis, serving the tiny model."""
    settings = GatewaySettings(
        redis_url=redis_url,
        data_root=tmp_path,
        models=[str(model_dir)],
        sse_block_ms=50,
        allowed_hosts=["testserver"],  # TestClient's Host header; keyless gateways check it
    )
    with TestClient(create_app(settings)) as client:
        yield client
