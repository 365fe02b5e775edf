"""Gateway settings: every SELPRUNE_* variable the gateway reads, in one place.

Built once by `get_settings()` (cached) in `python -m service`; tests pass their own instance to
`create_app(settings)`. `redis_url` has no default, so a gateway without a queue fails at start.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, RedisDsn, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from protocol import EMBEDDED_MODEL
from protocol.constants import IMAGE_MODELS, MASKED_LM_MODELS
from protocol.hub_policy import HUB_OFF, parse_hub_datasets


def _split_commas(value: Any) -> Any:
    """`"a, b,,c"` -> `["a", "b", "c"]`; lists pass through."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SELPRUNE_", extra="ignore")

    # Redis (or Valkey) holding the job queue, job state and masks, e.g. redis://127.0.0.1:6379/0.
    redis_url: RedisDsn
    # Address and port `python -m service` binds; a non-loopback host requires api_keys.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # Comma-separated Bearer keys; each key is its own tenant. Empty = auth off, loopback only.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # Folder that {"kind": "file"} dataset paths resolve inside (the worker must see the same folder).
    data_root: Path = Path("./data")
    # Model ids a job may name (comma-separated in the environment).
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [EMBEDDED_MODEL])
    # Built-in image classifiers and masked LMs a job may name (comma-separated; empty: none). A worker
    # trains each on first use, for minutes on a CPU, so an operator may turn them off.
    builtin_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [*IMAGE_MODELS, *MASKED_LM_MODELS]
    )
    # Also accept any hub id or local folder name as a model (the worker must be able to load it).
    allow_any_model: bool = False
    # Hub datasets a job may name: "off", "any" or comma-separated ids (protocol/hub_policy.py; as the worker's).
    hub_datasets: Annotated[str, AfterValidator(parse_hub_datasets)] = HUB_OFF
    # Extra Host header names accepted (comma-separated); keyless mode always checks Host (DNS rebinding).
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Bearer token GET /metrics requires; unset: /metrics is open.
    metrics_key: SecretStr | None = None
    # Largest request body in bytes; larger bodies get 413 before they are parsed.
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Largest total number of characters over all inline datasets of one request.
    max_inline_chars: int = Field(default=2_000_000, ge=1)
    # Largest number of texts over all inline datasets of one request.
    max_inline_texts: int = Field(default=10_000, ge=1)
    # Caps on a job's budgets: tokens collected per dataset, tokens evaluated per eval set, pruning steps.
    max_collect_tokens: int = Field(default=1_000_000, ge=1)
    max_eval_tokens: int = Field(default=1_000_000, ge=1)
    max_steps: int = Field(default=200, ge=1)
    # Seconds an idempotency key keeps pointing at the job it created.
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=1)
    # Most unfinished (queued or running) jobs one tenant may hold; more get 429. 0 = no cap.
    max_active_jobs_per_tenant: int = Field(default=50, ge=0)
    # Retry-After seconds on that 429.
    jobs_retry_after_s: int = Field(default=30, ge=1)
    # Seconds a job stays in the listings (GET /v1/jobs); match the worker's SELPRUNE_JOB_TTL_SECONDS.
    job_history_s: int = Field(default=7 * 24 * 3600, ge=60)
    # Most Redis connections this gateway process opens (streams and generation waits hold one each).
    redis_max_connections: int = Field(default=200, ge=4)
    # Most job event streams one tenant may hold open on this gateway process; more get 429.
    max_event_streams_per_tenant: int = Field(default=8, ge=1)
    # Seconds an event stream lasts before the gateway ends it (the client reconnects with Last-Event-ID).
    event_stream_max_s: float = Field(default=3600.0, gt=0)
    # Milliseconds one XREAD BLOCK of the events endpoint waits before a keep-alive comment.
    sse_block_ms: int = Field(default=15_000, ge=10)
    # Most jobs a GET /metrics scan reads to count jobs by state (newest first).
    metrics_scan_limit: int = Field(default=10_000, ge=1)
    # Seconds a generation request waits for a serving worker (for its first event, and between
    # streamed events) before the gateway answers 504.
    generate_timeout_s: float = Field(default=60.0, gt=0)
    # Cap on max_new_tokens (max_tokens in the OpenAI routes) of one request.
    max_new_tokens: int = Field(default=512, ge=1)
    # Cap on the characters of one request's prompts or messages (the worker caps tokens itself).
    max_prompt_chars: int = Field(default=32_000, ge=1)
    # Cap on the rows of one generation request: prompts x n.
    max_generate_rows: int = Field(default=16, ge=1)
    # Cap on one tenant's generation rows in flight (queued or decoding); past it, 429 with Retry-After.
    max_inflight_rows_per_tenant: int = Field(default=32, ge=1)

    @field_validator("api_keys", "models", "builtin_models", "allowed_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("builtin_models")
    @classmethod
    def _known_builtins(cls, value: list[str]) -> list[str]:
        known = (*IMAGE_MODELS, *MASKED_LM_MODELS)
        if unknown := [m for m in value if m not in known]:
            raise ValueError(f"unknown built-in models {unknown}; known: {', '.join(known)}")
        return value

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)


@lru_cache
def get_settings() -> GatewaySettings:
    """The process's settings, read from the environment once."""
    return GatewaySettings()  # type: ignore[call-arg]  # redis_url comes from the environment
