"""Names and rules both sides of the wire agree on: the embedded model, the method vocabularies and
the dataset-reference rules the gateway checks before queueing.

The core has its own copies (the gateway cannot import it); tests/test_contract_sync.py keeps them equal.
"""

from __future__ import annotations

import re
from typing import Literal

SCHEMA_VERSION = 1
EMBEDDED_MODEL = "smollm2-135m-instruct"

# "accuracy" is the image classifiers' metric (top-1 / top-k, per class), "masked_token" the masked LMs'
# (top-1 / top-k / loss at seeded masked positions); the others are for causal LMs on texts.
MetricName = Literal["next_token", "toxicity", "membership", "relearn", "accuracy", "masked_token"]
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


# Dataset references: the rules the gateway checks before queueing.
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


# Image classifiers (worker/image_models.py, worker/image_data.py): the built-in models and image sets a
# request may name, and what an image dataset file must be.
VIT_DIGITS_MODEL = (
    "builtin:vit-digits"  # the digits ViT, trained once by the worker (selprune_core.vision_model)
)
IMAGE_MODELS = (VIT_DIGITS_MODEL,)  # built-in image classifiers: always known to the gateway
BUILTIN_IMAGE_SETS = ("builtin:digits",)  # scikit-learn's 8x8 handwritten digits, ten classes
IMAGE_FILE_SUFFIXES = (".npz",)  # arrays `images` [N, H, W] or [N, C, H, W] and `labels` [N]
MAX_CLASS_ID = 100_000  # class ids a label filter may name


# Masked LMs (worker/mlm_models.py): the built-in ones a request may name. They read text datasets.
MLM_CODE_PROSE_MODEL = "builtin:mlm-code-prose"  # the code/prose RoBERTa-style MLM (selprune_core.mlm_model)
MASKED_LM_MODELS = (MLM_CODE_PROSE_MODEL,)  # built-in masked LMs: always known to the gateway
