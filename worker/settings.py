"""WorkerSettings: every setting of a worker process, read from SELPRUNE_* environment variables.

Built once by `get_settings()` in `python -m worker` and passed down; nothing reads os.environ
elsewhere. `redis_url` has no default, so a worker without it fails at start-up.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from protocol.hub_policy import HUB_OFF, parse_hub_datasets

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
Role = Literal["jobs", "serve"]
_DTYPES = {"auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16"}  # as in core devices
_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # core devices.DEVICE_MAP_STRATEGIES
# One max_memory entry, as core devices.parse_max_memory reads it: 0=20GiB, cuda:1=500MB, cpu=64000000000.
_MAX_MEMORY_ENTRY = re.compile(r"^((cuda:)?\d+|cpu|mps)\s*=\s*\d+(\.\d+)?\s*(b|[kmgt]i?b)?$", re.IGNORECASE)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "selprune"


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SELPRUNE_", extra="ignore")

    # Redis holding the job stream, job hashes and masks, e.g. redis://127.0.0.1:6379/0. Required.
    redis_url: str
    # Model and dataset caches (downloaded and embedded model weights, resolved datasets).
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    # Folder that {"kind": "file"} dataset references resolve inside; paths may not leave it.
    data_root: Path = Path("data")
    # Folder local model references must resolve inside (symlinks followed); the embedded model and the
    # operator's SELPRUNE_MODELS entries load regardless.
    models_root: Path = Path("models")
    # The gateway's model list (comma-separated, SELPRUNE_MODELS): these refs load as given, even outside models_root.
    models: Annotated[
        list[str],
        NoDecode,
        BeforeValidator(
            lambda v: [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v
        ),
    ] = Field(default_factory=list)
    # Hub datasets a job may name: "off", "any" or comma-separated ids (protocol/hub_policy.py; as the gateway's).
    hub_datasets: Annotated[str, AfterValidator(parse_hub_datasets)] = HUB_OFF
    # Folder where export jobs write folded checkpoints (<export_root>/<mask_id>/).
    export_root: Path = Path("exports")
    # Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps.
    device: str = "auto"
    # Weight dtype: auto (bfloat16 on GPUs that support it, else float16; bfloat16 on CPUs with
    # AVX512-BF16 or AMX, else float32), float32/fp32, float16/fp16/half or bfloat16/bf16.
    dtype: str = "auto"
    # Spread each model over several devices (accelerate's device_map): auto, balanced, balanced_low_0
    # or sequential fill the GPUs, then CPU memory, then disk. Unset: the whole model on `device`.
    device_map: str | None = None
    # With device_map: memory each device may hold, e.g. "0=20GiB,1=20GiB,cpu=60GiB" (GPU index, cpu or
    # mps = bytes or a size). Unset: what is free.
    max_memory: str | None = None
    # How many loaded models the worker keeps (LRU); each costs device memory.
    model_cache_size: int = Field(default=2, ge=1)
    # Seconds a job lease lives without renewal; a heartbeat thread renews it every lease_seconds/3.
    # A worker that stops renewing (killed, hung) loses the job after this long.
    lease_seconds: float = Field(default=30.0, gt=0)
    # Seconds an unacknowledged stream entry idles before another worker claims it (XAUTOCLAIM).
    # The running worker touches its entry at every heartbeat, so keep this above lease_seconds/3.
    visibility_timeout: float = Field(default=60.0, gt=0)
    # Starts of one job (the first included) before it is dead-lettered as RetriesExhausted.
    max_attempts: int = Field(default=3, ge=1)
    # Wall-clock seconds one attempt of a job may run; past it the job stops at its next check, failed JobTimeout.
    job_timeout_s: float = Field(default=6 * 3600, gt=0)
    # This worker's consumer name in the stream group and its heartbeat key; unique per process.
    worker_id: str = Field(default_factory=_default_worker_id, min_length=1)
    # Seconds a finished job's hash, step list and events are kept (default 7 days).
    job_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=1)
    # Milliseconds one XREADGROUP waits for a new job; also bounds how fast SIGTERM is noticed when idle.
    poll_block_ms: int = Field(default=1000, ge=1)
    # Logging level of `python -m worker` (DEBUG, INFO, WARNING, ...).
    log_level: str = "INFO"

    # Serving lane -------------------------------------------------------------------------------
    # What this process does, comma-separated: "jobs" (unlearning, evaluation, export), "serve"
    # (generation requests), or both. With both, serving runs in its own thread beside the job loop and
    # shares the loaded models, so a long job does not hold up generation.
    roles: Annotated[list[Role], NoDecode] = Field(default_factory=lambda: list[Role](["jobs", "serve"]))
    # Most rows (prompts x n, over all requests) the serving loop runs as one batch.
    serve_max_batch: int = Field(default=8, ge=1, le=256)
    # Milliseconds the serving loop waits, after a first request arrives, for more to share its batch.
    serve_batch_window_ms: int = Field(default=5, ge=0, le=1000)
    # Masks kept on the device per model (LRU by mask id); each costs layers x (d_mlp + d_attn) bytes.
    serve_mask_cache: int = Field(default=256, ge=1)
    # Longest prompt in tokens the serving loop accepts; longer ones are answered PromptTooLong.
    max_prompt_tokens: int = Field(default=2048, ge=1)
    # Rows the serving loop reads ahead of its batch, so admission can take tenants in turn (round robin).
    serve_max_pending: int = Field(default=64, ge=0, le=4096)

    @field_validator("roles", mode="before")
    @classmethod
    def _split_roles(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @field_validator("roles")
    @classmethod
    def _check_roles(cls, value: list[Role]) -> list[Role]:
        if not value:
            raise ValueError('roles must name at least one of "jobs" and "serve"')
        return list(dict.fromkeys(value))

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, not {value!r}")
        return value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(sorted(_DTYPES))}, not {value!r}")
        return value

    @field_validator("device_map")
    @classmethod
    def _check_device_map(cls, value: str | None) -> str | None:
        value = (value or "").strip().lower() or None
        if value is not None and value not in _DEVICE_MAPS:
            raise ValueError(f"device_map must be one of {', '.join(_DEVICE_MAPS)}, not {value!r}")
        return value

    @field_validator("max_memory")
    @classmethod
    def _check_max_memory(cls, value: str | None) -> str | None:
        value = (value or "").strip() or None
        for part in (value or "").split(","):
            if part.strip() and not _MAX_MEMORY_ENTRY.match(part.strip()):
                raise ValueError(
                    f"max_memory entry {part.strip()!r}: use DEVICE=SIZE, e.g. 0=20GiB,cpu=60GiB"
                )
        return value

    @model_validator(mode="after")
    def _max_memory_needs_a_map(self) -> WorkerSettings:
        if self.max_memory and not self.device_map:
            raise ValueError("max_memory bounds a device_map: set SELPRUNE_DEVICE_MAP too (e.g. auto)")
        return self

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, not {value!r}")
        return value


def apply_process_defaults() -> None:
    """Environment defaults a worker process needs before torch is imported (call it first).

    OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning. A worker's job and serving
    lanes issue torch ops from two threads, and small machines share their cores with other processes;
    with spinning threads either case oversubscribes the cores and we measured CPU forward passes
    slowing about 15x (3.7 vs 61 tokens/s). An operator's own setting wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@lru_cache
def get_settings() -> WorkerSettings:
    """The process's settings, read from the environment once."""
    return WorkerSettings()  # type: ignore[call-arg]  # redis_url comes from the environment
