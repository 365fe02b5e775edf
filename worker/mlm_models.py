"""Masked LMs in the worker: which references name one, and how one loads.

A reference is a masked LM when it is a built-in one (``builtin:mlm-code-prose``: the code/prose
RoBERTa-style MLM of selprune_core.mlm_model, trained once into the cache) or a local folder whose
``config.json`` names a ``*ForMaskedLM`` architecture (worker/model_refs.py), under the text models'
models-root confinement: a refusal reads like "not there". Weights load from safetensors only, without
remote code (selprune_core.mlm_measure.load_masked_lm). The loaded form is the core's `MaskedLM`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from protocol.constants import MLM_CODE_PROSE_MODEL
from selprune_core.devices import choose_dtype, resolve_device
from selprune_core.errors import ModelLoadError
from selprune_core.mlm_measure import MaskedLM, load_masked_lm
from selprune_core.mlm_model import MlmRecipe, ensure_code_prose_mlm
from worker.model_refs import confined_folder, model_kind

__all__ = ["BUILTIN_MASKED_LMS", "MASK_LITERAL", "is_masked_lm", "load_mlm"]

log = logging.getLogger(__name__)

BUILTIN_MASKED_LMS = (MLM_CODE_PROSE_MODEL,)  # what `load_mlm` builds itself; protocol copies it
MASK_LITERAL = "<mask>"  # what a fill-mask input may write for the model's own mask token


def is_masked_lm(ref: str, models_root: Path | None) -> bool:
    """Whether `ref` names a masked LM (see the module docstring)."""
    return model_kind(ref, models_root) == "masked_lm"


def load_mlm(
    ref: str,
    *,
    cache_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    models_root: Path | None = None,
    recipe: MlmRecipe | None = None,
) -> MaskedLM:
    """Load a masked LM in eval mode on `device`; dtype "auto" is float32 (these models are small)."""
    torch_device = resolve_device(device)
    torch_dtype = torch.float32 if dtype.strip().lower() == "auto" else choose_dtype(dtype, torch_device)[0]
    if ref == MLM_CODE_PROSE_MODEL:
        folder = ensure_code_prose_mlm(cache_dir, recipe)  # trains once (minutes on a CPU)
    else:
        found = confined_folder(ref, models_root)
        if found is None:
            raise ModelLoadError(
                f"model {ref!r} is not available: use {MLM_CODE_PROSE_MODEL} or a masked LM folder "
                "under the worker's models root"
            )
        folder = found
    target = load_masked_lm(folder, device=torch_device, dtype=torch_dtype)
    log.info(
        "loaded masked LM %s (%s, %d layers, d_mlp %d) on %s as %s, fingerprint %s",
        ref,
        type(target.model).__name__,
        target.sites.n_layers,
        target.sites.d_mlp,
        torch_device,
        torch_dtype,
        target.fingerprint,
    )
    return target
