"""Shared fixtures: tiny models of every supported family, a tokenizer built in code, a real Redis.

Nothing here downloads: HF_HUB_OFFLINE makes an accidental hub call fail at once.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from tests.helpers import build_model, build_tokenizer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for model tests (cpu or cuda)")


def pytest_configure(config: pytest.Config) -> None:
    random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--device") == "cpu":
        skip_gpu = pytest.mark.skip(reason="needs --device cuda")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def make_tiny_model(arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    return build_model(arch, tokenizer, seed)


@pytest.fixture
def tiny_model(tokenizer: PreTrainedTokenizerFast) -> Callable[[str], PreTrainedModel]:
    """Factory: a fresh tiny model of a family (fresh, because some tests edit weights)."""
    return lambda arch, seed=0: make_tiny_model(arch, tokenizer, seed)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The Redis server started by .ci/run (SELPRUNE_TEST_REDIS_URL); the db is flushed around each test."""
    url = os.environ.get("SELPRUNE_TEST_REDIS_URL")
    if not url:
        message = "SELPRUNE_TEST_REDIS_URL is not set (./dev test starts a Redis server and sets it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def model_dir(
    tiny_model: Callable[..., PreTrainedModel], tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> Path:
    """A tiny random llama and the test tokenizer saved as a local checkpoint folder."""
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
