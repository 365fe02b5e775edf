"""The queue contract: versioned pydantic models that cross between gateway and worker as JSON.

Imports only pydantic and stdlib, because the gateway (which never imports torch) imports it. The
wire form is always `model_dump(mode="json")`; the worker re-validates with `model_validate` first.
`to_config()` converters import selprune_core lazily, so only the worker pays for torch.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from selprune_core.config import PruneConfig, SamplingConfig
    from selprune_core.data import DatasetRef

SCHEMA_VERSION = 1
EMBEDDED_MODEL = "smollm2-135m-instruct"

MetricName = Literal["next_token", "toxicity"]
# Copies of the core's names (the gateway cannot import it); tests/test_contract_sync.py keeps them equal.
ScoringName = Literal[
    "freq",
    "abs",
    "rms",
    "std",
    "sqrt",
    "mean",
    "rand",
    "legacy_rms",
    "legacy_std",
    "dev",
    "abs_out",
    "rms_out",
    "dev_out",
    "taylor",
    "taylor_mean",
]
OffsetMode = Literal["zero", "retain_mean"]
SelectionMode = Literal["global", "per_layer"]
RecipeName = Literal["selprune", "paper"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Dataset references ------------------------------------------------------------------------------
# The rules the gateway checks before queueing, mirroring selprune_core's (which the gateway cannot
# import); tests/test_contract_sync.py keeps the two copies equal.
BUILTIN_DATASETS = (
    "python_code",
    "english_prose",
    "toxic",
    "toxic_prompts",
    "toxic_continuations",
    "clean_continuations",
)
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
    name: str = Field(
        description="python_code, english_prose, toxic, toxic_prompts, or (generated per model by the worker) "
        "toxic_continuations, clean_continuations"
    )


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


class BudgetSpec(_Strict):
    """A retain budget: a step that breaks it is retried smaller from the last accepted mask."""

    max_retain_drop: float | None = Field(
        default=None, ge=0, le=1, description="largest relative retain top-1 drop a step may leave"
    )
    max_retain_ppl_increase: float | None = Field(
        default=None, ge=0, le=100, description="largest retain perplexity increase, e.g. 0.1 = +10%"
    )
    forget_target: float | None = Field(
        default=None, ge=0, le=1, description="stop once the forget top-1 drop reaches this"
    )
    shrink: float = Field(default=0.5, gt=0, lt=1, description="fraction multiplier after a rejected step")
    min_frac_ratio: float = Field(
        default=1 / 16, gt=0, lt=1, description="give up below this share of the starting fractions"
    )

    @model_validator(mode="after")
    def _has_a_limit(self) -> BudgetSpec:
        if self.max_retain_drop is None and self.max_retain_ppl_increase is None:
            raise ValueError("a budget needs max_retain_drop or max_retain_ppl_increase")
        return self


# Named recipes: the method settings a job gets for every field it leaves unset. "paper" is the
# authors' method as run (abs importance, zero ablation, every position counted, global top-k);
# "selprune" is ours, chosen on a validation split (docs/results.md, "Choosing the defaults").
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "ff_scoring": "abs",
        "attn_scoring": "abs",
        "offset_mode": "zero",
        "skip_first": 0,
        "pack": False,
        "selection": "global",
    },
    "selprune": {
        "ff_scoring": "dev",
        "attn_scoring": "dev",
        "offset_mode": "retain_mean",
        "skip_first": 0,
        "pack": False,
        "selection": "per_layer",
    },
}


# Presets: whole recommended jobs, one field in POST /v1/unlearn. A request's own fields win over the
# preset's (params key by key). "detox" removes toxicity: forget the model's own continuations of toxic
# prompts that the scorer flags, keep its continuations of the same prompts that it does not flag (same
# register and length), check English prose as well, under a retain perplexity budget.
PresetName = Literal["detox"]
PRESETS: dict[str, dict[str, Any]] = {
    "detox": {
        "name": "detox",
        "forget": {"kind": "builtin", "name": "toxic_continuations"},
        "retain": {"kind": "builtin", "name": "clean_continuations"},
        "eval": [{"kind": "builtin", "name": "english_prose"}],
        "params": {
            "recipe": "selprune",
            "ff_frac": 0.01,
            "attn_frac": 0.0,
            "steps": 8,
            "budget": {"max_retain_ppl_increase": 0.1},
        },
    },
}


def apply_preset(data: Any) -> Any:
    """A request body with its preset's fields filled in where the body leaves them out."""
    if not isinstance(data, dict) or data.get("preset") is None:
        return data
    preset = PRESETS.get(str(data["preset"]))
    if preset is None:  # the Literal check reports the unknown name
        return data
    merged = {**preset, **data}
    if isinstance(data.get("params"), dict):
        merged["params"] = {**preset.get("params", {}), **data["params"]}
    return merged


class PruneParams(_Strict):
    """Algorithm knobs. Fields left unset take the values of `recipe`; budgets are sized so the
    default job on the embedded model finishes in minutes on 2 CPU cores (the paper uses 1e5 tokens
    per collection)."""

    recipe: RecipeName = Field(
        default="selprune", description="named defaults for the method fields: selprune (ours) or paper"
    )
    ff_frac: float = Field(default=0.02, ge=0, le=1, description="fraction of all FF neurons pruned per step")
    attn_frac: float = Field(
        default=0.0, ge=0, le=1, description="fraction of attention pre-out neurons per step"
    )
    ff_scoring: ScoringName = "abs"
    attn_scoring: ScoringName = "abs"
    ff_eps: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    attn_eps: float = Field(default=1e-4, gt=0, allow_inf_nan=False)
    steps: int = Field(default=5, ge=1, le=1000)
    collect_tokens: int = Field(default=10_000, ge=1, description="tokens per dataset per collection")
    token_limit: int = Field(default=512, ge=2, le=8192, description="per-text truncation")
    eval_tokens: int = Field(default=5_000, ge=1, description="non-common-token predictions per eval set")
    batch_size: int = Field(default=8, ge=1, le=256)
    recalculate: bool = True
    prune_heads: bool = False
    head_reduce: Literal["mean", "median"] = "mean"
    offset_mode: OffsetMode = Field(
        default="zero", description="what a pruned neuron outputs: zero, or retain_mean (its retain-set mean)"
    )
    selection: SelectionMode = Field(
        default="global", description="global top-k across layers, or per_layer quotas"
    )
    skip_first: int = Field(
        default=0, ge=0, le=64, description="leave out each text's first positions from the statistics"
    )
    pack: bool = Field(
        default=False, description="pack texts into full token_limit windows for the statistics"
    )
    exclude_first_token: bool = Field(default=False, description="deprecated: the same as skip_first=1")
    seed: int = 0
    random_baseline: bool = False
    stop: StopSpec | None = None
    budget: BudgetSpec | None = Field(
        default=None, description="adaptive step size under a retain budget, checked on a validation split"
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        # Fields the caller left out take the recipe's values; explicit fields always win.
        if not isinstance(data, dict):
            return data
        name = data.get("recipe", "selprune")
        recipe = RECIPES.get(name) if isinstance(name, str) else None
        if recipe is None:  # let the Literal check report the unknown name
            return data
        return {**recipe, **data}

    def to_config(self) -> PruneConfig:
        from selprune_core.config import BudgetConfig, CollectConfig, EvalConfig, PruneConfig, StopConfig

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
            offset_mode=self.offset_mode,
            selection=self.selection,
            stop=StopConfig(**self.stop.model_dump()) if self.stop else None,
            budget=BudgetConfig(**self.budget.model_dump()) if self.budget else None,
            collect=CollectConfig(
                token_limit=self.token_limit,
                sample_tokens=self.collect_tokens,
                batch_size=self.batch_size,
                skip_first=max(self.skip_first, 1 if self.exclude_first_token else 0),
                pack=self.pack,
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


# Serving lane ------------------------------------------------------------------------------------
# A generation request crosses as one GenerateTask (stream entry field "task"); the worker answers on
# the request's reply list (keys.GENERATE_REPLY_KEY) with GenerateEvent items: deltas when streaming,
# then exactly one `done` or `error`. Caps (prompt size, max_new_tokens, rows) are the gateway's job;
# the worker re-checks what only it can measure (prompt tokens, the model's context length).
class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingParams(_Strict):
    """Decoding settings of one request; every row of the request uses them."""

    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="1 = off")
    top_k: int = Field(default=0, ge=0, description="0 = off")
    seed: int | None = Field(default=None, description="row i samples with seed + i; None = random")
    stop: list[str] = Field(default_factory=list, max_length=4)
    ignore_eos: bool = Field(default=False, description="keep generating past EOS (for benchmarks)")

    def to_config(self, row: int = 0) -> SamplingConfig:
        """The core's config for row `row` of the request (its seed offset by the row index)."""
        from selprune_core.config import SamplingConfig

        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=None if self.seed is None else self.seed + row,
            stop=tuple(self.stop),
            ignore_eos=self.ignore_eos,
        )


class GenerateTask(_Strict):
    """One generation request for the serving lane: len(prompts) x n rows (or n rows for a chat),
    all on one model and one mask. Row i = prompt i // n, sample i % n; choice index = row index."""

    schema_version: Literal[1] = 1
    request_id: str
    tenant: str
    model: str = EMBEDDED_MODEL
    mask_id: str | None = None
    prompts: list[str] | None = None  # raw text, tokenized with the tokenizer's special tokens
    messages: list[ChatMessage] | None = None  # rendered with the model's chat template
    n: int = Field(default=1, ge=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    stream: bool = False  # send `delta` events as text is produced
    enqueued_at: float  # unix seconds, set by the gateway
    deadline: float  # unix seconds; past it the gateway has given up, so the worker skips the task

    @model_validator(mode="after")
    def _one_input(self) -> GenerateTask:
        if (self.prompts is None) == (self.messages is None):
            raise ValueError("exactly one of prompts and messages must be given")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts must not be empty")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self

    @property
    def rows(self) -> int:
        return (len(self.prompts) if self.prompts is not None else 1) * self.n


class GenerateDelta(_Strict):
    kind: Literal["delta"] = "delta"
    index: int  # the choice (row) this text extends
    text: str


class GenerateChoice(_Strict):
    index: int
    text: str  # cut before the first stop string
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


class GenerateUsage(_Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateTimings(_Strict):
    queue_ms: float  # enqueued_at -> the batch holding this request started
    model_ms: float  # time the batch spent in the model (prefill + decoding + sampling)
    batch_rows: int  # rows in that batch, this request's and others'


class GenerateDone(_Strict):
    kind: Literal["done"] = "done"
    model: str
    mask_id: str | None
    choices: list[GenerateChoice]
    usage: GenerateUsage
    timings: GenerateTimings


class GenerateFailed(_Strict):
    kind: Literal["error"] = "error"
    error: ErrorInfo


GenerateEvent = Annotated[GenerateDelta | GenerateDone | GenerateFailed, Field(discriminator="kind")]
