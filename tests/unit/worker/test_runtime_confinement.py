"""ModelRuntime applies the worker's settings: models only under the models root (the operator's own
model list aside), hub datasets only as SELPRUNE_HUB_DATASETS allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol import HubData, InlineData
from selprune_core.errors import ConfigError, DatasetNotFoundError, ModelLoadError
from worker.runtime import ModelRuntime
from worker.settings import WorkerSettings


def runtime(tmp_path: Path, **kwargs) -> ModelRuntime:
    return ModelRuntime(
        cache_dir=tmp_path / "cache", data_root=tmp_path, device="cpu", dtype="float32", **kwargs
    )


@pytest.mark.parametrize("policy", ["off", "other/set"])
def test_hub_datasets_refused_by_policy(tmp_path, policy):
    rt = runtime(tmp_path, hub_datasets=policy)
    with pytest.raises(ConfigError, match="SELPRUNE_HUB_DATASETS"):
        rt.dataset(HubData(id="org/corpus"))
    assert rt.dataset(InlineData(texts=["a text", "another"])).train  # other kinds are untouched


@pytest.mark.parametrize("policy", ["any", "org/corpus,x/y"])
def test_hub_datasets_allowed_by_policy_reach_the_hub(tmp_path, policy):
    # Offline (tests/conftest.py), reaching the hub fails as "not found", not as a refusal.
    with pytest.raises(DatasetNotFoundError, match="org/corpus"):
        runtime(tmp_path, hub_datasets=policy).dataset(HubData(id="org/corpus"))


def test_models_outside_the_root_are_refused_unless_the_operator_lists_them(tmp_path, model_dir):
    root = tmp_path / "models"
    root.mkdir()
    rt = runtime(tmp_path, models_root=root)
    with pytest.raises(ModelLoadError, match="not available"):
        rt.model(str(model_dir))
    assert rt.loaded_models() == []
    trusted = runtime(tmp_path, models_root=root, trusted_models=[str(model_dir)])
    assert trusted.model(str(model_dir)).sites.n_layers == 2


def test_worker_settings_defaults_are_confined(monkeypatch):
    for name in ("MODELS_ROOT", "MODELS", "HUB_DATASETS"):
        monkeypatch.delenv(f"SELPRUNE_{name}", raising=False)
    s = WorkerSettings(redis_url="redis://localhost:6379/0")
    assert (s.models_root, s.models, s.hub_datasets) == (Path("models"), [], "off")
    monkeypatch.setenv("SELPRUNE_MODELS", "smollm2-135m-instruct, /srv/ckpt")
    monkeypatch.setenv("SELPRUNE_HUB_DATASETS", " org/a ,b ")
    s = WorkerSettings(redis_url="redis://localhost:6379/0")
    assert s.models == ["smollm2-135m-instruct", "/srv/ckpt"] and s.hub_datasets == "org/a,b"
