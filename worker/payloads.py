"""The queue contract: versioned pydantic models that cross between gateway and worker as JSON.

Imports only pydantic and stdlib, because the gateway (which never imports torch) imports it. The
wire form is always `model_dump(mode="json")`; the worker re-validates with `model_validate` first.
`to_config()` converters import selprune_core lazily, so only the worker pays for torch.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from selprune_core.config import PruneConfig
    from selprune_core.data import DatasetRef

SCHEMA_VERSION = 1
EMBEDDED_MODEL = "smollm2-135m-instruct"

MetricName = Literal["next_token", "toxicity"]
ScoringName = Literal["freq", "abs", "rms", "std", "sqrt", "mean", "rand", "legacy_rms", "legacy_std"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Dataset references ------------------------------------------------------------------------------
# The rules the gateway checks before queueing, mirroring selprune_core's (which the gateway cannot
# import); tests/test_contract_sync.py keeps the two copies equal.
BUILTIN_DATASETS = ("python_code", "english_prose", "toxic", "toxic_prompts")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# Ids that datasets.load_dataset treats as local-file builders: as hub ids they would escape the data root.
PACKAGED_BUILDERS = frozenset(
    "arrow audiofolder cache csv eval generator hdf5 imagefolder json lance niftifolder pandas parquet "
    "pdffolder spark sql text videofolder webdataset xml".split()
)
FILTER_PATTERN = re.compile(r"\s*([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*")


class InlineData(_Strict):
    kind: Literal["inline"] = "inline"
    texts: list[str] = Field(min_length=1, description="the texts themselves")


class FileData(_Strict):
    kind: Literal["file"] = "file"
    path: str = Field(min_length=1, description="path relative to the configured data root")
    text_field: str = "text"
    filter: str | None = Field(default=None, description='e.g. "toxicity >= 0.8"')


class HubData(_Strict):
    kind: Literal["hub"] = "hub"
    id: str = Field(min_length=1)
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    filter: str | None = None


class BuiltinData(_Strict):
    kind: Literal["builtin"] = "builtin"
    name: str = Field(description="python_code, english_prose, toxic or toxic_prompts")


DatasetSpec = Annotated[InlineData | FileData | HubData | BuiltinData, Field(discriminator="kind")]


def to_dataset_ref(spec: InlineData | FileData | HubData | BuiltinData) -> DatasetRef:
    """The core's dataset reference for a wire spec."""
    from selprune_core.data import dataset_ref_from_dict

    return dataset_ref_from_dict(spec.model_dump())


# Pruning parameters ------------------------------------------------------------------------------
class StopSpec(_Strict):
    forget_drop: float | None = Field(
        default=None, ge=0, le=1, description="stop once the forget top-1 drop reaches this"
    )
    max_retain_drop: float | None = Field(
        default=None, ge=0, le=1, description="stop once the retain drop exceeds this"
    )


class PruneParams(_Strict):
    """Algorithm knobs. Defaults follow the paper, with budgets sized so the default job on the
    embedded model finishes in minutes on 2 CPU cores (the paper uses 1e5 tokens per collection)."""

    ff_frac: float = Field(default=0.02, ge=0, le=1, description="fraction of all FF neurons pruned per step")
    attn_frac: float = Field(
        default=0.0, ge=0, le=1, description="fraction of attention pre-out neurons per step"
    )
    ff_scoring: ScoringName = "abs"
    attn_scoring: ScoringName = "abs"
    ff_eps: float = Field(default=1e-3, gt=0)
    attn_eps: float = Field(default=1e-4, gt=0)
    steps: int = Field(default=5, ge=1, le=1000)
    collect_tokens: int = Field(default=10_000, ge=1, description="tokens per dataset per collection")
    token_limit: int = Field(default=512, ge=2, le=8192, description="per-text truncation")
    eval_tokens: int = Field(default=5_000, ge=1, description="non-common-token predictions per eval set")
    batch_size: int = Field(default=8, ge=1, le=256)
    recalculate: bool = True
    prune_heads: bool = False
    head_reduce: Literal["mean", "median"] = "mean"
    exclude_first_token: bool = False
    seed: int = 0
    random_baseline: bool = False
    stop: StopSpec | None = None

    def to_config(self) -> PruneConfig:
        from selprune_core.config import CollectConfig, EvalConfig, PruneConfig, StopConfig

        return PruneConfig(
            ff_frac=self.ff_frac,
            attn_frac=self.attn_frac,
            ff_scoring=self.ff_scoring,
            attn_scoring=self.attn_scoring,
            ff_eps=self.ff_eps,
            attn_eps=self.attn_eps,
            steps=self.steps,
            recalculate=self.recalculate,
            prune_heads=self.prune_heads,
            head_reduce=self.head_reduce,
            random_baseline=self.random_baseline,
            seed=self.seed,
            stop=StopConfig(**self.stop.model_dump()) if self.stop else None,
            collect=CollectConfig(
                token_limit=self.token_limit,
                sample_tokens=self.collect_tokens,
                batch_size=self.batch_size,
                exclude_first_token=self.exclude_first_token,
            ),
            eval=EvalConfig(
                token_limit=self.token_limit,
                sample_tokens=self.eval_tokens,
                batch_size=self.batch_size,
                seed=self.seed,
            ),
        )


# Jobs --------------------------------------------------------------------------------------------
class PruneJob(_Strict):
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


class EvaluateJob(_Strict):
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


class ExportJob(_Strict):
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


class ErrorInfo(BaseModel):
    """An error as data: the exception class name and a message meant for the caller."""

    type: str
    message: str


class JobProgress(BaseModel):
    """What the worker writes after every phase change and step; what GET /v1/jobs/{id} shows."""

    phase: str = "queued"  # queued, loading, resolving_data, evaluating, collecting_retain, ...
    step: int = 0
    steps: int = 0
    tokens: int = 0  # tokens counted in the current phase
    tokens_total: int = 0  # tokens collected over the whole job


def dump(model: BaseModel) -> dict[str, Any]:
    """The wire form."""
    return model.model_dump(mode="json")
