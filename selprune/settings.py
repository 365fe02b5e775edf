"""Settings of the `selprune` command line, read from SELPRUNE_* environment variables.

Command-line flags override them. The names match the operator contract (docs/operations.md), so one
environment configures the gateway, the worker and the CLI alike.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    """~/.cache/selprune, honouring XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "selprune"


class CliSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SELPRUNE_", extra="ignore")

    # Gateway the client commands (submit, status, wait, demo) talk to.
    url: str = "http://127.0.0.1:8000"
    # Bearer key sent to the gateway; unset for a loopback gateway without SELPRUNE_API_KEYS.
    api_key: str | None = None
    # The gateway's comma-separated keys; read only to pick a key for a stack `selprune up` starts itself.
    api_keys: str = ""
    # Redis for `selprune up` and `selprune worker`; unset means `selprune up` starts a local one.
    redis_url: str | None = None
    # Where `selprune up` binds the gateway.
    host: str = "127.0.0.1"
    port: int = 8000
    # Model and corpus caches (the embedded model's safetensors, extracted corpora) and child logs.
    cache_dir: Path = Field(default_factory=default_cache_dir)
    # Folder that `file:` dataset references resolve inside.
    data_root: Path = Path("data")
    # Device and dtype of `selprune prune` (the worker reads the same variables). dtype auto: bfloat16
    # on GPUs that support it (else float16) and on CPUs with AVX512-BF16 or AMX, else float32.
    device: str = "auto"
    dtype: str = "auto"
    # Spread the model over several devices (accelerate's device_map: auto, balanced, balanced_low_0,
    # sequential) and what each device may hold ("0=20GiB,cpu=60GiB"); unset: the whole model on `device`.
    device_map: str | None = None
    max_memory: str | None = None
