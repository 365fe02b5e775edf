"""Image dataset references (protocol.ImageData) resolved for one classifier: labelled images, split
train / validation / held-out, preprocessed as the model expects, filtered by class.

Sources:

* ``builtin:digits``: scikit-learn's 8x8 digits (pixel values 0..16, read as intensities value / 16);
* an ``.npz`` file under the data root (read with ``allow_pickle=False``) holding ``images`` [N, H, W]
  or [N, C, H, W] (integers read as 0..255, floats as intensities in [0, 1]) and integer ``labels`` [N].

Splits are selprune_core.images' (`stratified_split`, the digits' fractions and seeds): 30% of every
class held out, 15% of the rest for validation, so ``builtin:digits`` splits exactly as the digits ViT
was trained (its held-out images were never trained on). The class filter is applied after the split,
so a forget class keeps the same held-out images whichever way the set is filtered. Statistics are
collected on train, evaluation reads held-out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from protocol.constants import BUILTIN_IMAGE_SETS, IMAGE_FILE_SUFFIXES
from protocol.datasets import ImageData
from selprune_core.errors import DatasetError, DatasetNotFoundError, EmptyDatasetError
from selprune_core.images import DigitsSplitConfig, ImageSet, stratified_split
from worker.image_models import DIGITS_SCALE, LoadedClassifier, preprocess

__all__ = ["IMAGE_SOURCES", "ImageSplitSets", "LabelledImages", "image_splits", "intensities", "load_source"]

MAX_ELEMENTS = 256 * 1024 * 1024  # pixel values of one data set (1 GiB as float32)
IMAGE_SOURCES = ("builtin:digits",)  # what `load_source` reads besides files; protocol copies it


@dataclass(frozen=True)
class LabelledImages:
    """Raw images: intensities in [0, 1] [n, C, H, W] float32, labels [n] int64."""

    pixels: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class ImageSplitSets:
    """One image data set, preprocessed for a model and filtered by class, in its three splits."""

    name: str
    train: ImageSet  # statistics are collected on these
    validation: ImageSet
    heldout: ImageSet  # evaluation reads these


def intensities(array: np.ndarray, what: str) -> torch.Tensor:
    """An image array as float32 intensities in [0, 1]: integers as 0..255, floats as they are."""
    if array.dtype.kind in "iu":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DatasetError(f"{what}: integer pixels must lie in 0..255")
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if array.dtype.kind != "f":
        raise DatasetError(f"{what}: pixels must be integers (0..255) or floats (0..1), not {array.dtype}")
    values = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not torch.isfinite(values).all():
        raise DatasetError(f"{what}: pixels must be finite")
    if values.numel() and (values.min() < 0 or values.max() > 1):
        raise DatasetError(
            f"{what}: float pixels must be intensities in [0, 1] (found {float(values.min()):g}.."
            f"{float(values.max()):g}); divide by the largest possible pixel value"
        )
    return values


def _digits() -> LabelledImages:
    try:
        from sklearn.datasets import load_digits  # shipped with scikit-learn: no download
    except ImportError as exc:
        raise DatasetError("builtin:digits needs scikit-learn: pip install 'selprune[vision]'") from exc
    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32)[:, None] / DIGITS_SCALE  # [n, 1, 8, 8]
    return LabelledImages(pixels, torch.tensor(digits.target, dtype=torch.long))


def _npz_path(source: str, data_root: Path) -> Path:
    """`source` under the data root (relative, no '..', symlinks followed); DatasetNotFoundError else."""
    rel = PurePosixPath(source.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not source.endswith(IMAGE_FILE_SUFFIXES):
        raise DatasetNotFoundError(
            f"image source {source!r}: use {', '.join(BUILTIN_IMAGE_SETS)} or a relative path to an .npz file "
            "under the data root"
        )
    root = os.path.realpath(data_root)
    full = os.path.realpath(os.path.join(root, source))
    if os.path.commonpath([root, full]) != root or not os.path.isfile(full):
        raise DatasetNotFoundError(f"image file {source!r} not found under the data root")
    return Path(full)


def _npz(source: str, data_root: Path, max_images: int) -> LabelledImages:
    try:
        with np.load(_npz_path(source, data_root), allow_pickle=False) as archive:
            if "images" not in archive.files or "labels" not in archive.files:
                raise DatasetError(f"{source}: an image file needs arrays 'images' and 'labels'")
            images, labels = archive["images"], archive["labels"]
    except (OSError, ValueError) as exc:  # not a zip, a pickled array, a corrupt member
        raise DatasetError(f"{source}: not a readable .npz file ({exc})") from None
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(
            f"{source}: images must be [N, H, W] or [N, C, H, W] and labels [N]; got images "
            f"{list(images.shape)}, labels {list(labels.shape)}"
        )
    if len(labels) > max_images or images.size > MAX_ELEMENTS:
        raise DatasetError(
            f"{source}: {len(labels)} images of {list(images.shape[1:])}; the limit is "
            f"{max_images} images and {MAX_ELEMENTS} pixel values"
        )
    if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise DatasetError(f"{source}: labels must be non-negative integers")
    return LabelledImages(intensities(images, source), torch.from_numpy(labels.astype(np.int64)))


def load_source(source: str, *, data_root: Path, max_images: int) -> LabelledImages:
    """The raw labelled images of a source (see the module docstring)."""
    if source == "builtin:digits":
        images = _digits()
    elif source.startswith("builtin:"):
        raise DatasetNotFoundError(
            f"unknown built-in image set {source!r}; available: {', '.join(IMAGE_SOURCES)}"
        )
    else:
        images = _npz(source, data_root, max_images)
    if len(images.labels) == 0:
        raise EmptyDatasetError(f"{source}: no images")
    return images


def split_indices(labels: torch.Tensor, cfg: DigitsSplitConfig) -> tuple[torch.Tensor, ...]:
    """(train, validation, heldout) indices, as selprune_core.images.load_digits_splits draws them."""
    rest, held = stratified_split(labels, cfg.heldout_frac, cfg.seed)
    train_pos, val_pos = stratified_split(labels[rest], cfg.validation_frac, cfg.seed + 1)
    return rest[train_pos], rest[val_pos], held


def image_splits(
    spec: ImageData, classifier: LoadedClassifier, *, data_root: Path, max_images: int
) -> ImageSplitSets:
    """`spec` resolved for `classifier`: split, preprocessed, filtered by class."""
    raw = load_source(spec.source, data_root=data_root, max_images=max_images)
    n_classes = classifier.n_classes
    if int(raw.labels.max()) >= n_classes:
        raise DatasetError(
            f"{spec.source}: labels run to {int(raw.labels.max())}; model {classifier.ref!r} has "
            f"{n_classes} classes (0..{n_classes - 1})"
        )
    named = [*(spec.labels or []), *(spec.exclude_labels or [])]
    if outside := sorted(c for c in named if c >= n_classes):
        raise DatasetError(
            f"{spec.describe()}: class ids {outside} are outside the model's 0..{n_classes - 1}"
        )
    pixels = preprocess(raw.pixels, classifier.preprocess, classifier.dtype)

    def subset(index: torch.Tensor, name: str) -> ImageSet:
        images = ImageSet(pixels[index].contiguous(), raw.labels[index].contiguous())
        if spec.labels is not None:
            images = images.with_labels(spec.labels)
        elif spec.exclude_labels is not None:
            images = images.without_labels(spec.exclude_labels)
        if len(images) == 0 and name != "validation":  # jobs read train and held-out images
            raise EmptyDatasetError(f"{spec.describe()}: no {name} images are left after the class filter")
        return images

    train, validation, heldout = split_indices(raw.labels, DigitsSplitConfig())
    return ImageSplitSets(
        spec.describe(), subset(train, "train"), subset(validation, "validation"), subset(heldout, "held-out")
    )
