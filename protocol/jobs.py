"""The long-work lane's messages: the jobs a worker runs, their states and their progress."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from protocol.base import Strict
from protocol.constants import EMBEDDED_MODEL, MetricName
from protocol.datasets import DatasetSpec
from protocol.params import PruneParams


class PruneJob(Strict):
    """An unlearning job as queued."""

    schema_version: Literal[1] = 1
    job_kind: Literal["prune"] = "prune"
    job_id: str
    tenant: str
    model: str = EMBEDDED_MODEL
    forget: DatasetSpec
    retain: DatasetSpec
    eval: list[DatasetSpec] | None = Field(
        default=None,
        description="extra eval sets; the held-out parts of forget and retain are always evaluated",
    )
    name: str | None = None
    params: PruneParams = Field(default_factory=PruneParams)


class EvaluateJob(Strict):
    """Evaluate the base model and/or a mask on datasets."""

    schema_version: Literal[1] = 1
    job_kind: Literal["evaluate"] = "evaluate"
    job_id: str
    tenant: str
    model: str = EMBEDDED_MODEL
    mask_id: str | None = None
    include_base: bool = True
    datasets: list[DatasetSpec] = Field(min_length=1)
    metrics: list[MetricName] = Field(default_factory=lambda: list[MetricName](["next_token"]))
    eval_tokens: int = Field(default=5_000, ge=1)
    token_limit: int = Field(default=512, ge=2, le=8192)
    toxicity_max_new_tokens: int = Field(default=32, ge=1, le=512)
    toxicity_samples_per_prompt: int = Field(default=1, ge=1, le=16)
    toxicity_scorer: Literal["profanity", "detoxify"] = "profanity"
    seed: int = 0


class ExportJob(Strict):
    """Fold a mask into the model's weights and write a checkpoint transformers loads."""

    schema_version: Literal[1] = 1
    job_kind: Literal["export"] = "export"
    job_id: str
    tenant: str
    mask_id: str
    model: str | None = Field(default=None, description="defaults to the model the mask was made on")


AnyJob = Annotated[PruneJob | EvaluateJob | ExportJob, Field(discriminator="job_kind")]


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


class JobProgress(BaseModel):
    """What the worker writes after every phase change and step; what GET /v1/jobs/{id} shows."""

    phase: str = "queued"  # queued, loading, resolving_data, evaluating, collecting_retain, ...
    step: int = 0
    steps: int = 0
    tokens: int = 0  # tokens counted in the current phase
    tokens_total: int = 0  # tokens collected over the whole job
