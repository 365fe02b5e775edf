"""HTTP models, named by role. Request models build on the wire contract's types (protocol/):
EvaluateRequest is an EvaluateJob less the ids the gateway assigns; UnlearnRequest takes PruneJob's
fields with tighter HTTP limits and a preset, and `to_job` makes the job. Response models read the job
records (protocol.job_hash.JobHash) and the mask metadata the worker writes."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from protocol import (
    EMBEDDED_MODEL,
    ChatMessage,
    DatasetSpec,
    ErrorInfo,
    EvaluateJob,
    GenerateDone,
    GenerateTask,
    GenerateTimings,
    GenerateUsage,
    JobState,
    PresetName,
    PruneJob,
    PruneParams,
    SamplingParams,
    Strict,
    apply_preset,
)
from protocol.generate import SEED_LIMIT
from protocol.job_hash import JobHash
from protocol.jobs import check_prune_data
from protocol.params import MAX_EVAL_DATASETS

logger = logging.getLogger(__name__)

_IDEMPOTENCY_HELP = "repeat a request with the same key to get the first job back instead of a new one"


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx response."""

    error: ErrorInfo


# Requests ----------------------------------------------------------------------------------------
class UnlearnRequest(Strict):
    """Prune neurons that matter for `forget` more than for `retain`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "forget": {"kind": "builtin", "name": "python_code"},
                    "retain": {"kind": "builtin", "name": "english_prose"},
                    "name": "no-python",
                    "params": {"ff_frac": 0.02, "steps": 5},
                }
            ]
        },
    )

    preset: PresetName | None = Field(
        default=None,
        description="a recommended job: 'detox' fills forget, retain, eval and params (fields you give win)",
    )
    model: str = Field(default=EMBEDDED_MODEL, min_length=1, max_length=200)
    forget: DatasetSpec
    retain: DatasetSpec
    eval: list[DatasetSpec] | None = Field(
        default=None, max_length=MAX_EVAL_DATASETS, description="extra eval sets"
    )
    name: str | None = Field(default=None, max_length=200)
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200, description=_IDEMPOTENCY_HELP
    )
    params: PruneParams = Field(default_factory=PruneParams)

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        return apply_preset(data)

    @model_validator(mode="after")
    def _one_kind_of_data(self) -> UnlearnRequest:
        check_prune_data(self.model, self.datasets(), self.params)
        return self

    def datasets(self) -> list[DatasetSpec]:
        return [self.forget, self.retain, *(self.eval or [])]

    def to_job(self, job_id: str, tenant: str) -> PruneJob:
        return PruneJob(
            job_id=job_id,
            tenant=tenant,
            model=self.model,
            forget=self.forget,
            retain=self.retain,
            eval=self.eval,
            name=self.name,
            params=self.params,
        )


class EvaluateRequest(EvaluateJob):
    """An EvaluateJob without `job_id` and `tenant`, which the gateway assigns."""

    job_id: SkipJsonSchema[str] = Field(default="", exclude=True)
    tenant: SkipJsonSchema[str] = Field(default="", exclude=True)
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200, exclude=True, description=_IDEMPOTENCY_HELP
    )

    metrics_by_default: SkipJsonSchema[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _ids_are_assigned(cls, data: Any) -> Any:
        if isinstance(data, dict) and {"job_id", "tenant"} & data.keys():
            raise ValueError("job_id and tenant are assigned by the gateway; leave them out")
        if isinstance(data, dict) and "metrics_by_default" in data:
            raise ValueError("metrics_by_default is set by the gateway; name metrics, or leave both out")
        return data

    def to_job(self, job_id: str, tenant: str) -> EvaluateJob:
        return EvaluateJob.model_validate({**self.model_dump(), "job_id": job_id, "tenant": tenant})


# Generation --------------------------------------------------------------------------------------
def stop_list(value: Any) -> Any:
    """`stop` as a list: one string becomes a list of one, None an empty list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


class GenerateRequest(SamplingParams):
    """Generate from a raw-text `prompt` or chat `messages`, through a mask when `mask_id` is set. The
    sampling fields are the queue contract's; `stop` may also be one string."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "def fibonacci(n):", "mask_id": "<a mask id>", "max_new_tokens": 32},
                {"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0.7, "seed": 1},
            ]
        },
    )

    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="default: the mask's model, else the embedded one",
    )
    mask_id: str | None = Field(default=None, min_length=1, max_length=128)
    prompt: str | None = Field(default=None, min_length=1, description="raw text, continued as is")
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, description="a chat, rendered with the model's chat template"
    )
    seed: int | None = Field(
        default=None, ge=0, lt=SEED_LIMIT, description="fixes sampling; the response says which seed was used"
    )
    stream: bool = Field(default=False, description="server-sent events: `delta` {text}, then `done`")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        return stop_list(value)

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self

    def texts(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else [m.content for m in self.messages or []]

    def sampling(self, seed: int | None) -> SamplingParams:
        return SamplingParams.model_validate(
            self.model_dump(include=set(SamplingParams.model_fields)) | {"seed": seed}
        )


class GenerateResponse(BaseModel):
    """The generated text, why it ended, token counts and where the time went."""

    id: str
    model: str
    mask_id: str | None
    text: str
    finish_reason: Literal["stop", "length"]
    usage: GenerateUsage
    timings: GenerateTimings
    seed: int | None = Field(description="the seed sampled with; send it again to reproduce (null: greedy)")

    @classmethod
    def from_done(cls, task: GenerateTask, done: GenerateDone) -> GenerateResponse:
        choice = done.choices[0]
        return cls(
            id=task.request_id,
            model=done.model,
            mask_id=done.mask_id,
            text=choice.text,
            finish_reason=choice.finish_reason,
            usage=done.usage,
            timings=done.timings,
            seed=task.sampling.seed,
        )


# Jobs --------------------------------------------------------------------------------------------
class JobAccepted(BaseModel):
    """A queued job (or, for a repeated idempotency key, the job the key first created)."""

    job_id: str
    kind: str
    state: JobState
    created: bool = Field(description="false when an earlier request with the same idempotency key made it")
    status_url: str
    events_url: str


class EvalMetrics(BaseModel):
    """Next-token metrics on one eval set, with confidence intervals under `ci`."""

    model_config = ConfigDict(extra="allow")

    top1: float | None = None
    topk: float | None = None
    loss: float | None = None
    perplexity: float | None = None
    ci: dict[str, Any] | None = None


class StepMetrics(BaseModel):
    """One pruning step's report; step 0 is the model before pruning."""

    step: int
    ff_selected: int | None = None
    attn_selected: int | None = None
    ff_pruned: int | None = None
    attn_pruned: int | None = None
    metrics: dict[str, EvalMetrics] = Field(default_factory=dict)
    drops: dict[str, Any] | None = None
    seconds: float | None = None
    mask_id: str | None = None
    ff_frac: float | None = None  # per-step fractions this step (or trial) used
    attn_frac: float | None = None
    accepted: bool = True  # False: a trial over the retain budget, retried smaller; the mask did not change
    trial: int = 0
    budget: dict[str, Any] | None = Field(
        default=None, description="drops and retain perplexity increase on the budget's validation texts"
    )


def _summary_fields(job_id: str, job: JobHash) -> dict[str, Any]:
    """The fields JobSummary and JobStatusResponse share, read from a job hash."""
    return {
        "job_id": job_id,
        "kind": job.kind,
        "name": job.payload.get("name"),
        "state": job.state,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "mask_id": job.mask_id,
        "error": job.error,
    }


class JobSummary(BaseModel):
    job_id: str
    kind: str
    name: str | None = None
    state: JobState
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    mask_id: str | None = None
    error: ErrorInfo | None = None

    @classmethod
    def from_job_hash(cls, job_id: str, job: JobHash) -> JobSummary:
        return cls.model_validate(_summary_fields(job_id, job))


class JobList(BaseModel):
    jobs: list[JobSummary]


class JobStatusResponse(JobSummary):
    """Where a job is: state, phase and token counts, the metrics trajectory, the result or error."""

    phase: str
    step: int
    steps: int
    tokens: int = Field(description="tokens processed in the current phase")
    tokens_total: int = Field(description="tokens processed over the whole job")
    metrics: list[StepMetrics] = Field(
        description="one entry per completed step or rejected trial; step 0 is before pruning"
    )
    result: dict[str, Any] | None = None
    attempts: int = 0
    cancel_requested: bool = False

    @classmethod
    def from_job(cls, job_id: str, job: JobHash, steps: list[dict[str, Any]]) -> JobStatusResponse:
        metrics = []
        for report in steps:
            try:
                metrics.append(StepMetrics.model_validate(report))
            except ValueError:
                logger.warning("job %s: skipping a malformed step report", job_id)
        progress = job.progress
        return cls(
            **_summary_fields(job_id, job),
            phase=progress.phase,
            step=progress.step,
            steps=progress.steps,
            tokens=progress.tokens,
            tokens_total=progress.tokens_total,
            metrics=metrics,
            result=job.result,
            attempts=job.attempts,
            cancel_requested=job.cancel_requested,
        )


# Masks -------------------------------------------------------------------------------------------
class MaskSummary(BaseModel):
    mask_id: str
    model: str | None = None
    name: str | None = None
    job_id: str | None = None
    created_at: float | None = None


class MaskList(BaseModel):
    masks: list[MaskSummary]


class MaskInfo(MaskSummary):
    """A mask's metadata as the worker stored it (further fields pass through)."""

    model_config = ConfigDict(extra="allow")

    fingerprint: str | None = None
    size_bytes: int | None = None
    params: dict[str, Any] | None = None


class MaskDeleted(BaseModel):
    mask_id: str
    deleted: bool


# Health ------------------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: str = "ok"


class ReadyResponse(BaseModel):
    status: str = "ready"
    redis: bool
    workers: int  # job workers with a live heartbeat
    servers: int = 0  # serving workers with a live heartbeat
