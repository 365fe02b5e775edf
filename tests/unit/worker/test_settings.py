"""WorkerSettings from the environment, and the worker's fail-fast start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from worker import main as worker_main
from worker.settings import WorkerSettings, get_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    names = ("REDIS_URL", "DEVICE", "DTYPE", "LEASE_SECONDS", "WORKER_ID", "MAX_ATTEMPTS", "DATA_ROOT")
    for name in (*names, "DEVICE_MAP", "MAX_MEMORY"):
        monkeypatch.delenv(f"SELPRUNE_{name}", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_redis_url_is_required():
    with pytest.raises(ValidationError, match="redis_url"):
        WorkerSettings()


def test_reads_prefixed_env_and_ignores_unknown(monkeypatch):
    monkeypatch.setenv("SELPRUNE_REDIS_URL", "redis://db:6379/1")
    monkeypatch.setenv("SELPRUNE_LEASE_SECONDS", "12.5")
    monkeypatch.setenv("SELPRUNE_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("SELPRUNE_DATA_ROOT", "/srv/data")
    monkeypatch.setenv("SELPRUNE_DTYPE", "BF16")
    monkeypatch.setenv("SELPRUNE_API_KEYS", "gateway-only")  # another process's setting
    s = get_settings()
    assert s is get_settings()  # built once
    assert (s.redis_url, s.lease_seconds, s.max_attempts) == ("redis://db:6379/1", 12.5, 5)
    assert s.data_root == Path("/srv/data") and s.dtype == "bf16"


def test_defaults(monkeypatch):
    # Defaults, not whatever the shell running the tests exports (./dev sets SELPRUNE_CACHE_DIR).
    for name in (
        "SELPRUNE_CACHE_DIR",
        "SELPRUNE_DATA_ROOT",
        "SELPRUNE_EXPORT_ROOT",
        "SELPRUNE_DEVICE",
        "SELPRUNE_DTYPE",
    ):
        monkeypatch.delenv(name, raising=False)
    s = WorkerSettings(redis_url="redis://localhost:6379/0")
    assert (s.device, s.dtype, s.model_cache_size, s.max_attempts) == ("auto", "auto", 2, 3)
    assert (s.lease_seconds, s.visibility_timeout, s.poll_block_ms) == (30.0, 60.0, 1000)
    assert s.job_ttl_seconds == 7 * 24 * 3600
    assert s.data_root == Path("data") and s.export_root == Path("exports")
    assert s.cache_dir.name == "selprune"
    assert s.worker_id != WorkerSettings(redis_url="redis://localhost:6379/0").worker_id


@pytest.mark.parametrize(
    "bad",
    [
        {"redis_url": "localhost:6379"},
        {"device": "tpu"},
        {"dtype": "int8"},
        {"lease_seconds": 0},
        {"max_attempts": 0},
        {"poll_block_ms": 0},
    ],
)
def test_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        WorkerSettings(**{"redis_url": "redis://localhost:6379/0", **bad})


def test_main_fails_fast_when_redis_is_unreachable(monkeypatch):
    monkeypatch.setenv("SELPRUNE_REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(SystemExit, match="cannot reach Redis at redis://127.0.0.1:1/0"):
        worker_main.main([])


def test_main_reports_missing_settings():
    with pytest.raises(SystemExit, match="invalid settings"):
        worker_main.main([])


def test_worker_settings_device_map(monkeypatch):
    monkeypatch.setenv("SELPRUNE_REDIS_URL", "redis://127.0.0.1:6379/0")
    assert WorkerSettings().device_map is None
    monkeypatch.setenv("SELPRUNE_DEVICE_MAP", "")
    assert WorkerSettings().device_map is None
    monkeypatch.setenv("SELPRUNE_DEVICE_MAP", "Balanced")
    monkeypatch.setenv("SELPRUNE_MAX_MEMORY", "0=20GiB,cpu=60GiB")
    settings = WorkerSettings()
    assert (settings.device_map, settings.max_memory) == ("balanced", "0=20GiB,cpu=60GiB")
    monkeypatch.setenv("SELPRUNE_MAX_MEMORY", "0=lots")
    with pytest.raises(ValidationError, match="max_memory entry"):
        WorkerSettings()
    monkeypatch.setenv("SELPRUNE_MAX_MEMORY", "cpu=1GB")
    monkeypatch.setenv("SELPRUNE_DEVICE_MAP", "")
    with pytest.raises(ValidationError, match="set SELPRUNE_DEVICE_MAP"):
        WorkerSettings()
    monkeypatch.setenv("SELPRUNE_DEVICE_MAP", "everywhere")
    with pytest.raises(ValidationError, match="device_map must be one of"):
        WorkerSettings()


def test_cli_settings_read_the_same_variables(monkeypatch):
    from selprune.settings import CliSettings

    monkeypatch.setenv("SELPRUNE_DEVICE_MAP", "auto")
    monkeypatch.setenv("SELPRUNE_MAX_MEMORY", "cpu=8GiB")
    settings = CliSettings()
    assert (settings.device_map, settings.max_memory) == ("auto", "cpu=8GiB")
