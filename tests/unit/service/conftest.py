"""Gateway fixtures: the app on a real Redis (tests/conftest.py `redis_url`), settings and client
factories, a data root with files and an escaping symlink, and a sync Redis client for assertions."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import GatewaySettings
from tests.unit.service.helpers import KEY_A, KEY_B


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """data/forget.jsonl, data/sub/retain.txt, a secret file outside, and a symlink pointing at it."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "forget.jsonl").write_text(json.dumps({"text": "def f(): pass"}) + "\n")
    (root / "sub" / "retain.txt").write_text("plain english prose\n")
    (tmp_path / "secret.txt").write_text("outside the root\n")
    (root / "escape.txt").symlink_to(tmp_path / "secret.txt")
    return root


@pytest.fixture
def make_settings(redis_url: str, data_root: Path) -> Callable[..., GatewaySettings]:
    def make(**overrides: Any) -> GatewaySettings:
        # "testserver": the Host header of TestClient, which a keyless gateway must be told to accept.
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "data_root": data_root,
            "sse_block_ms": 50,
            "allowed_hosts": "testserver",
        }
        return GatewaySettings(**(values | overrides))

    return make


@pytest.fixture
def make_client(make_settings: Callable[..., GatewaySettings]) -> Iterator[Callable[..., TestClient]]:
    """Factory: a started TestClient for settings overrides; closed at teardown."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    """No API keys: every caller is the tenant "local"."""
    return make_client()


@pytest.fixture
def authed(make_client: Callable[..., TestClient]) -> TestClient:
    """Two API keys, KEY_A and KEY_B (send them with `headers=auth(KEY_A)`)."""
    return make_client(api_keys=f"{KEY_A},{KEY_B}")


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
