"""ModelRuntime: a model being loaded for one lane does not stall another lane's cached lookups."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from selprune_core import loading
from worker import runtime as runtime_module
from worker.runtime import ModelRuntime


@pytest.fixture
def checkpoints(tiny_model, tokenizer, tmp_path) -> list[Path]:
    paths = []
    for i, arch in enumerate(("llama", "gpt2", "opt")):
        path = tmp_path / f"m{i}"
        tiny_model(arch).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def test_cached_lookup_does_not_wait_for_another_models_load(checkpoints, tmp_path, monkeypatch):
    runtime = ModelRuntime(
        cache_dir=tmp_path, data_root=tmp_path, device="cpu", dtype="float32", max_models=2
    )
    first = runtime.model(str(checkpoints[0]))
    started, release = threading.Event(), threading.Event()

    def slow_load(ref: str, **kwargs):  # the real loader, held at its start until the test says go
        if ref == str(checkpoints[1]):
            started.set()
            assert release.wait(30)
        return loading.load_model(ref, **kwargs)

    monkeypatch.setattr(runtime_module, "load_model", slow_load)
    loader = threading.Thread(target=runtime.model, args=(str(checkpoints[1]),))
    loader.start()
    assert started.wait(30)
    assert runtime.model(str(checkpoints[0])) is first  # answered while the other load is in progress
    release.set()
    loader.join(30)
    assert runtime.loaded_models() == [str(checkpoints[0]), str(checkpoints[1])]


def test_least_recently_used_model_is_evicted(checkpoints, tmp_path):
    runtime = ModelRuntime(
        cache_dir=tmp_path, data_root=tmp_path, device="cpu", dtype="float32", max_models=2
    )
    a, b, c = (str(p) for p in checkpoints)
    runtime.model(a)
    runtime.model(b)
    runtime.model(a)  # a is now the most recent
    runtime.model(c)
    assert runtime.loaded_models() == [a, c]


def test_device_map_and_max_memory_reach_the_loader(checkpoints, tmp_path):
    """SELPRUNE_DEVICE_MAP / SELPRUNE_MAX_MEMORY: here no room in memory, so every weight goes to disk."""
    runtime = ModelRuntime(
        cache_dir=tmp_path,
        data_root=tmp_path,
        dtype="float32",
        max_models=2,
        device_map="auto",
        max_memory="cpu=1",
    )
    loaded = runtime.model(str(checkpoints[0]))
    assert loaded.device_map == {"": "disk"}
    assert loaded.device.type == "cpu"
    plain = ModelRuntime(cache_dir=tmp_path, data_root=tmp_path, device="cpu", dtype="float32")
    assert plain.model(str(checkpoints[0])).device_map is None
