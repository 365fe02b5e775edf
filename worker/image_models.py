"""Image classifiers in the worker: which references name one, how one loads, and how its inputs are
prepared (size, channels, normalisation).

A reference is an image classifier when it is a built-in one (``builtin:vit-digits``: the digits ViT of
selprune_core.vision_model, trained once into the cache) or a local folder whose ``config.json`` names a
``*ForImageClassification`` architecture. Local folders follow the text models' confinement rules
(selprune_core/loading.py): with a models root, a folder must resolve inside it (symlinks followed)
unless the operator listed it, and every refusal reads like "not there". Weights load from safetensors
only, without remote code.

Preprocessing turns pixel intensities in [0, 1] ([n, C, H, W]) into the model's input: channels
converted (grey repeated to RGB, RGB to grey by ITU-R 601 luma, alpha dropped), resized to the model's
size (bilinear, antialiased), then normalised per channel. The statistics come from the folder's
``preprocessor_config.json`` (``image_mean``/``image_std``, as transformers' image processors write
them); the digits ViT's are its train mean and std (``training.json``), which `write_preprocessor`
records in every export, so an exported folder carries its own normalisation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageClassification

from protocol.constants import VIT_DIGITS_MODEL
from selprune_core.devices import choose_dtype, resolve_device
from selprune_core.errors import ConfigError, ModelLoadError
from selprune_core.image_measure import ImageClassifier, image_classifier
from selprune_core.masks import NeuronMask
from selprune_core.sites import ModelSites
from selprune_core.vision_model import TRAINING_FILE, VitRecipe, ensure_digits_vit
from worker.model_refs import confined_folder, model_kind

__all__ = [
    "BUILTIN_IMAGE_MODELS",
    "DIGITS_SCALE",
    "ImagePreprocess",
    "LoadedClassifier",
    "is_image_model",
    "load_classifier",
    "preprocess",
    "write_preprocessor",
]

log = logging.getLogger(__name__)

BUILTIN_IMAGE_MODELS = (VIT_DIGITS_MODEL,)  # what `load_classifier` builds itself; protocol copies it
PREPROCESSOR_FILE = "preprocessor_config.json"
DIGITS_SCALE = 16.0  # the digits' pixel values run 0..16
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow's convert("L")
_DEFAULT_MEAN, _DEFAULT_STD = 0.5, 0.5  # transformers' ViTImageProcessor defaults, for folders without one


@dataclass(frozen=True)
class ImagePreprocess:
    """What a model expects of its input images."""

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]  # per channel, on intensities in [0, 1]
    std: tuple[float, ...]


@dataclass(frozen=True)
class LoadedClassifier:
    """A loaded image classifier: the core's view of it, its labels and its preprocessing."""

    target: ImageClassifier  # model (eval mode), sites, fingerprint, n_classes
    ref: str
    labels: tuple[str, ...]  # [n_classes] the model's name for each class id
    preprocess: ImagePreprocess
    device: torch.device
    dtype: torch.dtype

    @property
    def model(self) -> nn.Module:
        return self.target.model

    @property
    def sites(self) -> ModelSites:
        return self.target.sites

    @property
    def fingerprint(self) -> str:
        return self.target.fingerprint

    @property
    def n_classes(self) -> int:
        return self.target.n_classes

    def full_mask(self) -> NeuronMask:
        return NeuronMask.full(self.sites, self.fingerprint)


def is_image_model(ref: str, models_root: Path | None) -> bool:
    """Whether `ref` names an image classifier: a built-in one, or a folder this worker may load whose
    config names a *ForImageClassification architecture (worker/model_refs.py)."""
    return model_kind(ref, models_root) == "image_classifier"


def load_classifier(
    ref: str,
    *,
    cache_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    models_root: Path | None = None,
    digits_recipe: VitRecipe | None = None,
) -> LoadedClassifier:
    """Load an image classifier (see the module docstring), frozen in eval mode on `device`.

    dtype "auto" is float32: these models are small, and their statistics and accuracies are cheap.
    """
    torch_device = resolve_device(device)
    torch_dtype = torch.float32 if dtype.strip().lower() == "auto" else choose_dtype(dtype, torch_device)[0]
    if ref == VIT_DIGITS_MODEL:
        folder = ensure_digits_vit(cache_dir, digits_recipe)  # trains once (about a minute on a CPU)
    else:
        found = confined_folder(ref, models_root)
        if found is None:
            raise ModelLoadError(
                f"model {ref!r} is not available: use {VIT_DIGITS_MODEL} or an image classifier folder "
                "under the worker's models root"
            )
        folder = found
    try:
        model = AutoModelForImageClassification.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cannot load image classifier %s: %s", ref, exc)
        raise ModelLoadError(
            f"model {ref!r} does not load as an image classifier: a folder needs config.json and "
            "safetensors weights (pickled .bin weights are refused)"
        ) from exc
    module: nn.Module = model
    module.to(device=torch_device, dtype=torch_dtype)
    module.requires_grad_(False)
    target = image_classifier(module)  # eval mode; UnsupportedArchitectureError without hook sites
    config: Any = model.config
    id2label = getattr(config, "id2label", None) or {}
    labels = tuple(str(id2label.get(i, id2label.get(str(i), i))) for i in range(target.n_classes))
    loaded = LoadedClassifier(target, ref, labels, _preprocess_of(folder, config), torch_device, torch_dtype)
    log.info(
        "loaded image classifier %s (%s, %d layers, d_mlp %d, %d classes) on %s as %s, fingerprint %s",
        ref,
        type(model).__name__,
        target.sites.n_layers,
        target.sites.d_mlp,
        target.n_classes,
        torch_device,
        torch_dtype,
        target.fingerprint,
    )
    return loaded


def _size(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    return None


def _preprocess_of(folder: Path, config: Any) -> ImagePreprocess:
    """The model's input size and channels (its config), and its normalisation: the digits ViT's
    training statistics, else the folder's image processor settings, else transformers' ViT defaults."""
    height, width = _size(getattr(config, "image_size", None)) or (224, 224)
    channels = int(getattr(config, "num_channels", 3))
    mean, std = (_DEFAULT_MEAN,) * channels, (_DEFAULT_STD,) * channels
    processor, training = folder / PREPROCESSOR_FILE, folder / TRAINING_FILE
    if processor.is_file():
        settings = json.loads(processor.read_text())
        height, width = _size(settings.get("size")) or (height, width)
        if settings.get("do_normalize", True):
            mean = _per_channel(settings.get("image_mean", mean), channels, "image_mean")
            std = _per_channel(settings.get("image_std", std), channels, "image_std")
        else:
            mean, std = (0.0,) * channels, (1.0,) * channels
    elif training.is_file():  # the digits ViT: normalised with its train split's pixel mean and std
        stats = json.loads(training.read_text())["normalisation"]
        mean = (float(stats["mean"]) / DIGITS_SCALE,) * channels
        std = (float(stats["std"]) / DIGITS_SCALE,) * channels
    return ImagePreprocess(height, width, channels, mean, std)


def _per_channel(value: Any, channels: int, name: str) -> tuple[float, ...]:
    values = [float(v) for v in value] if isinstance(value, list | tuple) else [float(value)]
    if len(values) == 1:
        values *= channels
    if len(values) != channels or any(name == "image_std" and v <= 0 for v in values):
        raise ModelLoadError(f"{PREPROCESSOR_FILE}: {name} {value!r} does not fit {channels} channels")
    return tuple(values)


def write_preprocessor(prep: ImagePreprocess, folder: Path) -> None:
    """Record `prep` as transformers' ViTImageProcessor reads it (intensities 0..255 rescaled by 1/255)."""
    settings = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": prep.height, "width": prep.width},
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(prep.mean),
        "image_std": list(prep.std),
    }
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True))


def preprocess(
    pixels: torch.Tensor, prep: ImagePreprocess, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Intensities in [0, 1] [n, C, H, W] as the model's input [n, channels, height, width]."""
    assert pixels.ndim == 4, f"pixels must be [n, C, H, W], got {tuple(pixels.shape)}"
    x = pixels.to(torch.float32)
    have, want = x.shape[1], prep.channels
    if have == 4 and want != 4:  # drop alpha
        x, have = x[:, :3], 3
    if have != want:
        if have == 1:
            x = x.expand(-1, want, -1, -1)
        elif have == 3 and want == 1:
            x = (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ConfigError(f"images have {have} channels; the model takes {want}")
    if tuple(x.shape[2:]) != (prep.height, prep.width):
        x = F.interpolate(
            x, size=(prep.height, prep.width), mode="bilinear", antialias=True, align_corners=False
        )
    mean = torch.tensor(prep.mean).view(1, want, 1, 1)
    std = torch.tensor(prep.std).view(1, want, 1, 1)
    return ((x - mean) / std).to(dtype).contiguous()
