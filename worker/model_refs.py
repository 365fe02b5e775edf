"""Which kind of model a reference names, from the reference alone (nothing loads).

A reference is an image classifier when it is a built-in one or a folder whose ``config.json`` names a
``*ForImageClassification`` architecture, a masked LM when it is a built-in one or a folder naming a
``*ForMaskedLM`` architecture, and a causal language model otherwise (a hub id, a .gguf file, a folder
of any other architecture). Local folders follow the text models' confinement rules
(selprune_core/loading.py): with a models root, a folder must resolve inside it (symlinks followed),
and every refusal reads like "not there".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from protocol.constants import IMAGE_MODELS, MASKED_LM_MODELS

__all__ = ["ModelKind", "confined_folder", "model_kind"]

ModelKind = Literal["causal_lm", "masked_lm", "image_classifier"]
_SUFFIXES: dict[str, ModelKind] = {"ForImageClassification": "image_classifier", "ForMaskedLM": "masked_lm"}


def confined_folder(ref: str, models_root: Path | None) -> Path | None:
    """The folder `ref` names, if it is one this worker may load (inside the root when there is one)."""
    try:
        path = Path(ref).expanduser()
        if models_root is not None:
            base = models_root.resolve()
            full = (path if path.is_absolute() else base / path).resolve()
            if not full.is_relative_to(base):
                return None
        else:
            full = path.resolve()
        return full if (full / "config.json").is_file() else None
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte, a name too long
        return None


def model_kind(ref: str, models_root: Path | None) -> ModelKind:
    """What `ref` names (see the module docstring)."""
    if ref in IMAGE_MODELS:
        return "image_classifier"
    if ref in MASKED_LM_MODELS:
        return "masked_lm"
    folder = confined_folder(ref, models_root)
    if folder is None:
        return "causal_lm"
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "causal_lm"
    names = config.get("architectures") if isinstance(config, dict) else None
    for name in names if isinstance(names, list) else []:
        for suffix, kind in _SUFFIXES.items():
            if str(name).endswith(suffix):
                return kind
    return "causal_lm"
