"""The real embedded model (SmolLM2-135M-Instruct), loaded once per session from the setup cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from selprune_core.loading import EMBEDDED_MODEL, LoadedModel, load_model


def cache_dir() -> Path:
    return Path(os.environ.get("SELPRUNE_CACHE_DIR", Path.home() / ".cache" / "selprune"))


def require_setup() -> None:
    """Skip locally when `./dev setup` has not run; in CI a missing asset is a failure."""
    models = cache_dir() / "models" / EMBEDDED_MODEL
    corpora = cache_dir() / "corpora"
    if not (models.exists() and corpora.exists()):
        message = f"embedded model or corpora missing under {cache_dir()} (run ./dev setup)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    require_setup()
    return load_model(EMBEDDED_MODEL, cache_dir=cache_dir(), device="cpu", dtype="float32")
