"""docker-compose.yml is validated as a file (no Docker engine runs here)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_health_ordering():
    services = _compose()["services"]
    assert set(services) == {"redis", "gateway", "worker"}
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert "--appendonly" in services["redis"]["command"]
    for name in ("gateway", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["environment"]["SELPRUNE_REDIS_URL"].startswith("redis://redis:")


def test_worker_has_gpu_and_cache_volumes():
    worker = _compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert any(v.startswith("model-cache:") for v in worker["volumes"])


def test_gateway_requires_api_keys_and_dockerfiles_exist():
    gateway = _compose()["services"]["gateway"]
    assert ":?" in gateway["environment"]["SELPRUNE_API_KEYS"]  # compose refuses to start without keys
    for service in ("gateway", "worker"):
        dockerfile = ROOT / _compose()["services"][service]["build"]["dockerfile"]
        assert dockerfile.exists()
        # The gateway image installs the package without the torch-carrying [worker] extra.
        assert ("[worker" in dockerfile.read_text()) == (service == "worker")


def test_env_example_lists_every_setting():
    """Every field of every process's settings class appears in .env.example, so operators see it."""
    from selprune.settings import CliSettings
    from service.settings import GatewaySettings
    from worker.settings import WorkerSettings

    text = (ROOT / ".env.example").read_text()
    for settings in (GatewaySettings, WorkerSettings, CliSettings):
        prefix = settings.model_config.get("env_prefix", "")
        for field in settings.model_fields:
            name = f"{prefix}{field}".upper()
            assert f"{name}=" in text, f"{name} ({settings.__name__}) is missing from .env.example"
