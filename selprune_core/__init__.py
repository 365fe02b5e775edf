"""selprune_core: selective pruning (Pochinkov & Schoots) as a plain library.

Load a model, resolve forget/retain datasets, collect per-neuron activation statistics through scoped
hooks, score neurons as importance(forget) / (importance(retain) + eps), prune the top fraction, repeat,
and evaluate after every step. The result is a NeuronMask: keep flags for every feed-forward and
attention pre-out neuron, content-addressed and bound to its model's fingerprint.

This package imports torch and transformers only: no web, queue or environment settings.
"""

from __future__ import annotations

from selprune_core.activations import ActivationStats, ComponentStats, collect_activations, record_activations
from selprune_core.batching import TokenBatch, iter_packed_batches, iter_token_batches
from selprune_core.config import (
    BudgetConfig,
    CollectConfig,
    EvalConfig,
    PruneConfig,
    SamplingConfig,
    StopConfig,
    ToxicityConfig,
)
from selprune_core.corpora import BUILTIN_CORPORA, load_builtin, setup_corpora
from selprune_core.data import (
    BuiltinRef,
    DatasetRef,
    FileRef,
    HubRef,
    InlineRef,
    dataset_ref_from_dict,
    describe,
    resolve_dataset,
)
from selprune_core.decoding import DecodeBatch
from selprune_core.errors import (
    CancelledError,
    ConfigError,
    DatasetError,
    DatasetNotFoundError,
    EmptyDatasetError,
    MaskMismatchError,
    ModelLoadError,
    ScorerUnavailableError,
    SelPruneError,
    UnsupportedArchitectureError,
)
from selprune_core.evaluation import (
    EvalResult,
    common_target_ids,
    evaluate_sets,
    evaluate_texts,
    relative_drop,
)
from selprune_core.generation import (
    Generation,
    GenerationRow,
    apply_chat_template,
    encode_prompts,
    generate,
    generate_rows,
    sample_next,
)
from selprune_core.hooks import scoped_pre_hooks
from selprune_core.image_measure import ImageClassifier, ImageMeasure, evaluate_images, image_classifier
from selprune_core.images import ImageSet, ImageSplits, load_digits_splits
from selprune_core.loading import EMBEDDED_MODEL, LoadedModel, ensure_embedded_model, load_model
from selprune_core.masking import MaskFactors, apply_mask, apply_row_masks, fold_into_weights
from selprune_core.masks import NeuronMask
from selprune_core.mlm_eval import MlmMasking, evaluate_mlm
from selprune_core.mlm_measure import MaskedLM, MlmMeasure, load_masked_lm, masked_lm
from selprune_core.mlm_model import MlmRecipe, ensure_code_prose_mlm, load_code_prose_mlm
from selprune_core.pruning import (
    Progress,
    PruneCallbacks,
    PruneOptions,
    PruneResult,
    PruneRun,
    StepReport,
    prune_iteratively,
)
from selprune_core.scoring import SCORERS, score_neurons, select_top_neurons
from selprune_core.sites import ModelSites, model_fingerprint, resolve_sites
from selprune_core.splits import TextSplits, carve_validation
from selprune_core.toxicity import (
    ToxicityResult,
    ToxicityScorer,
    get_scorer,
    toxicity_metric,
    wilson_interval,
)
from selprune_core.vision_model import VitRecipe, ensure_digits_vit, load_digits_vit

__all__ = [
    "carve_validation",
    "wilson_interval",
    "iter_packed_batches",
    "MaskFactors",
    "BudgetConfig",
    "BUILTIN_CORPORA",
    "EMBEDDED_MODEL",
    "SCORERS",
    "ActivationStats",
    "BuiltinRef",
    "CancelledError",
    "CollectConfig",
    "ComponentStats",
    "DecodeBatch",
    "ConfigError",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetRef",
    "EmptyDatasetError",
    "EvalConfig",
    "EvalResult",
    "FileRef",
    "Generation",
    "GenerationRow",
    "HubRef",
    "ImageClassifier",
    "ImageMeasure",
    "ImageSet",
    "ImageSplits",
    "InlineRef",
    "LoadedModel",
    "MaskMismatchError",
    "ModelLoadError",
    "ModelSites",
    "NeuronMask",
    "Progress",
    "PruneCallbacks",
    "PruneConfig",
    "PruneOptions",
    "PruneResult",
    "PruneRun",
    "SamplingConfig",
    "ScorerUnavailableError",
    "SelPruneError",
    "StepReport",
    "StopConfig",
    "TextSplits",
    "TokenBatch",
    "ToxicityConfig",
    "ToxicityResult",
    "ToxicityScorer",
    "UnsupportedArchitectureError",
    "VitRecipe",
    "apply_chat_template",
    "apply_mask",
    "apply_row_masks",
    "collect_activations",
    "common_target_ids",
    "dataset_ref_from_dict",
    "describe",
    "encode_prompts",
    "ensure_digits_vit",
    "ensure_embedded_model",
    "evaluate_images",
    "evaluate_sets",
    "evaluate_texts",
    "fold_into_weights",
    "generate",
    "generate_rows",
    "get_scorer",
    "image_classifier",
    "iter_token_batches",
    "load_builtin",
    "load_digits_splits",
    "load_digits_vit",
    "load_model",
    "model_fingerprint",
    "prune_iteratively",
    "record_activations",
    "relative_drop",
    "resolve_dataset",
    "resolve_sites",
    "sample_next",
    "scoped_pre_hooks",
    "score_neurons",
    "select_top_neurons",
    "setup_corpora",
    "toxicity_metric",
    "MaskedLM",
    "MlmMasking",
    "MlmMeasure",
    "MlmRecipe",
    "ensure_code_prose_mlm",
    "evaluate_mlm",
    "load_code_prose_mlm",
    "load_masked_lm",
    "masked_lm",
]
