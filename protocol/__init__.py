"""The wire contract between the gateway (`service/`) and the workers (`worker/`).

Both sides build on this package and on nothing of each other's. It imports only the standard library
and pydantic, so the gateway stays free of torch. Its parts:

    constants   the embedded model's name, the method vocabularies, the dataset-reference rules
    base        the strict base model, errors as data (`ErrorInfo`) and the JSON wire form (`dump`)
    datasets    dataset references as they cross the wire
    params      pruning parameters, recipes and presets
    jobs        the long-work lane's jobs, states and progress
    generate    the serving lane's requests and reply events
    classify    the serving lane's image classification requests and replies
    fill_mask   the serving lane's masked-LM fill-mask requests and replies
    keys        every Redis key, stream and channel name
    job_hash    the typed layout of a job's Redis hash
    scripts     the Lua scripts (each written once) and the operations built on them

Queue payloads are versioned pydantic models sent as JSON (`dump`), never pickled; the receiving side
re-validates with `model_validate` first.
"""

from __future__ import annotations

from protocol.base import ErrorInfo, Strict, dump
from protocol.classify import ClassifyDone, ClassifyEvent, ClassifyTask, ClassLabel, ImagePrediction
from protocol.constants import (
    EMBEDDED_MODEL,
    IMAGE_MODELS,
    MASKED_LM_MODELS,
    MLM_CODE_PROSE_MODEL,
    SCHEMA_VERSION,
    VIT_DIGITS_MODEL,
    MetricName,
    OffsetMode,
    RecipeName,
    ScoringName,
    SelectionMode,
)
from protocol.datasets import BuiltinData, DatasetSpec, FileData, HubData, ImageData, InlineData
from protocol.fill_mask import FilledInput, FilledToken, FillMaskDone, FillMaskEvent, FillMaskTask, MaskFill
from protocol.generate import (
    ChatMessage,
    ChoiceLogprobs,
    GenerateChoice,
    GenerateDelta,
    GenerateDone,
    GenerateEvent,
    GenerateFailed,
    GenerateTask,
    GenerateTimings,
    GenerateUsage,
    SamplingParams,
)
from protocol.jobs import AnyJob, EvaluateJob, ExportJob, JobProgress, JobState, PruneJob
from protocol.params import PRESETS, RECIPES, BudgetSpec, PresetName, PruneParams, StopSpec, apply_preset

__all__ = [
    "EMBEDDED_MODEL",
    "PRESETS",
    "RECIPES",
    "SCHEMA_VERSION",
    "AnyJob",
    "BudgetSpec",
    "BuiltinData",
    "ChatMessage",
    "ClassLabel",
    "ClassifyDone",
    "ClassifyEvent",
    "ClassifyTask",
    "DatasetSpec",
    "ErrorInfo",
    "EvaluateJob",
    "ExportJob",
    "FileData",
    "FilledInput",
    "FilledToken",
    "FillMaskDone",
    "FillMaskEvent",
    "FillMaskTask",
    "MaskFill",
    "ChoiceLogprobs",
    "GenerateChoice",
    "GenerateDelta",
    "GenerateDone",
    "GenerateEvent",
    "GenerateFailed",
    "GenerateTask",
    "GenerateTimings",
    "GenerateUsage",
    "HubData",
    "IMAGE_MODELS",
    "MASKED_LM_MODELS",
    "MLM_CODE_PROSE_MODEL",
    "ImageData",
    "ImagePrediction",
    "InlineData",
    "JobProgress",
    "JobState",
    "MetricName",
    "OffsetMode",
    "PresetName",
    "PruneJob",
    "PruneParams",
    "RecipeName",
    "SamplingParams",
    "ScoringName",
    "SelectionMode",
    "StopSpec",
    "VIT_DIGITS_MODEL",
    "Strict",
    "apply_preset",
    "dump",
]
