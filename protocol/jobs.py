"""The long-work lane's messages: the jobs a worker runs, their states and their progress."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.base import Strict
from protocol.constants import EMBEDDED_MODEL, MetricName
from protocol.datasets import DatasetSpec, check_data_kind
from protocol.params import (
    JOB_SEED_LIMIT,
    MAX_EVAL_DATASETS,
    MAX_TOKEN_BUDGET,
    PruneParams,
    check_batch_tokens,
)

EVAL_BATCH_SIZE = 8  # texts per forward pass of an evaluation job (and prompts per toxicity generate call)
MAX_TOXICITY_PROMPTS = 1024  # prompts per dataset an evaluation job samples continuations of
MAX_TOXICITY_TOKENS_PER_PROMPT = 1024  # samples_per_prompt x max_new_tokens
MAX_TOXICITY_TOKENS = 262_144  # tokens generated per dataset and variant: prompts x samples x max_new_tokens
MAX_MEMBERSHIP_TEXTS = 1024  # whole texts per side of the membership attack, per dataset and variant
MAX_RELEARN_TEXTS = 1024  # train texts the relearning attack cycles through
MAX_RELEARN_STEPS = 200  # optimizer steps of EVAL_BATCH_SIZE // 2 texts, per dataset and variant
MAX_RELEARN_TOKENS = 262_144  # tokens trained on per dataset and variant: steps x texts x token_limit


IMAGE_METRICS = ("accuracy",)  # what an evaluation of image datasets measures
_GRADIENT_SCORINGS = ("taylor", "taylor_mean")


def check_prune_data(model: str, datasets: Sequence[DatasetSpec], params: PruneParams) -> None:
    """One kind of data, fitting a built-in model; image jobs take fixed steps (no budget), statistics
    without gradients and without packing (ValueError naming the field otherwise)."""
    if check_data_kind(model, datasets) != "images":
        return
    if params.budget is not None:
        raise ValueError(
            "params.budget: a retain budget is not supported for image classifiers; use fixed steps"
        )
    for field in ("ff_scoring", "attn_scoring"):
        if getattr(params, field) in _GRADIENT_SCORINGS:
            raise ValueError(f"params.{field}: gradient scorings (taylor, taylor_mean) are for texts only")
    if params.pack:
        raise ValueError("params.pack: packing applies to texts; an image is always one row")


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
        max_length=MAX_EVAL_DATASETS,
        description="extra eval sets; the held-out parts of forget and retain are always evaluated",
    )
    name: str | None = None
    params: PruneParams = Field(default_factory=PruneParams)

    @model_validator(mode="after")
    def _one_kind_of_data(self) -> PruneJob:
        check_prune_data(self.model, [self.forget, self.retain, *(self.eval or [])], self.params)
        return self

    @property
    def images(self) -> bool:
        """Whether the job prunes an image classifier on images."""
        return check_data_kind(self.model, [self.forget, self.retain]) == "images"


class EvaluateJob(Strict):
    """Evaluate the base model and/or a mask on datasets."""

    model_config = ConfigDict(allow_inf_nan=False)

    schema_version: Literal[1] = 1
    job_kind: Literal["evaluate"] = "evaluate"
    job_id: str
    tenant: str
    model: str = EMBEDDED_MODEL
    mask_id: str | None = None
    include_base: bool = True
    datasets: list[DatasetSpec] = Field(min_length=1, max_length=MAX_EVAL_DATASETS)
    metrics: list[MetricName] = Field(default_factory=lambda: list[MetricName](["next_token"]))
    eval_tokens: int = Field(default=5_000, ge=1, le=MAX_TOKEN_BUDGET)
    token_limit: int = Field(
        default=512,
        ge=2,
        le=8192,
        description=f"per-text truncation; {EVAL_BATCH_SIZE} texts per forward pass",
    )
    toxicity_max_new_tokens: int = Field(default=32, ge=1, le=512)
    toxicity_samples_per_prompt: int = Field(default=1, ge=1, le=16)
    toxicity_max_prompts: int = Field(
        default=256,
        ge=1,
        le=MAX_TOXICITY_PROMPTS,
        description="prompts per dataset scored for toxicity (the first)",
    )
    toxicity_scorer: Literal["profanity", "detoxify"] = "profanity"
    membership_texts: int = Field(
        default=64, ge=1, le=MAX_MEMBERSHIP_TEXTS, description="texts per side of the membership attack"
    )
    relearn_texts: int = Field(
        default=16, ge=1, le=MAX_RELEARN_TEXTS, description="train texts the relearning attack fine-tunes on"
    )
    relearn_steps: int = Field(default=10, ge=1, le=MAX_RELEARN_STEPS, description="optimizer steps")
    relearn_learning_rate: float = Field(default=5e-5, gt=0, le=1e-2)
    seed: int = Field(default=0, ge=0, lt=JOB_SEED_LIMIT)

    @model_validator(mode="before")
    @classmethod
    def _image_metrics_by_default(cls, data: Any) -> Any:
        # Image datasets have one metric; a request that names none gets it, not next_token.
        if isinstance(data, dict) and "metrics" not in data:
            datasets = data.get("datasets")
            if isinstance(datasets, list) and datasets:
                if all(isinstance(d, dict) and d.get("kind") == "images" for d in datasets):
                    return {**data, "metrics": list(IMAGE_METRICS)}
        return data

    @property
    def images(self) -> bool:
        """Whether the job evaluates an image classifier on images."""
        return check_data_kind(self.model, self.datasets) == "images"

    @model_validator(mode="after")
    def _bounded(self) -> EvaluateJob:
        if self.images:
            if other := [m for m in self.metrics if m not in IMAGE_METRICS]:
                raise ValueError(f"metrics {other} are for texts; image datasets take {list(IMAGE_METRICS)}")
        elif other := [m for m in self.metrics if m in IMAGE_METRICS]:
            raise ValueError(f"metrics {other} are for image datasets ({{'kind': 'images'}})")
        check_batch_tokens(EVAL_BATCH_SIZE, self.token_limit, "texts per batch", "token_limit")
        per_prompt = self.toxicity_samples_per_prompt * self.toxicity_max_new_tokens
        if per_prompt > MAX_TOXICITY_TOKENS_PER_PROMPT:
            raise ValueError(
                f"toxicity_samples_per_prompt x toxicity_max_new_tokens = {self.toxicity_samples_per_prompt} x "
                f"{self.toxicity_max_new_tokens} = {per_prompt} tokens per prompt; the limit is "
                f"{MAX_TOXICITY_TOKENS_PER_PROMPT}"
            )
        if "relearn" in self.metrics:
            trained = self.relearn_steps * (EVAL_BATCH_SIZE // 2) * self.token_limit
            if trained > MAX_RELEARN_TOKENS:
                raise ValueError(
                    f"relearn_steps x {EVAL_BATCH_SIZE // 2} texts x token_limit = {trained} tokens trained per "
                    f"dataset; the limit is {MAX_RELEARN_TOKENS} (lower relearn_steps or token_limit)"
                )
        total = self.toxicity_max_prompts * per_prompt
        if total > MAX_TOXICITY_TOKENS:
            raise ValueError(
                f"toxicity_max_prompts x toxicity_samples_per_prompt x toxicity_max_new_tokens = {total} tokens "
                f"generated per dataset; the limit is {MAX_TOXICITY_TOKENS} (lower toxicity_max_prompts)"
            )
        return self


class ExportJob(Strict):
    """Fold a mask into the model's weights and write a checkpoint transformers loads."""

    schema_version: Literal[1] = 1
    job_kind: Literal["export"] = "export"
    job_id: str
    tenant: str
    mask_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$", description="also the export's folder name")
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
