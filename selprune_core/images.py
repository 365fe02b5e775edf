"""Labelled image sets for classifier unlearning: the 8x8 handwritten digits, split deterministically.

The digits (scikit-learn's copy of the UCI set: 1,797 images of 8x8 pixels in 0..16, ten classes) are
the one image data set available offline, so it is what the image path is built and tested on.

    all images --stratified 30%--> heldout         (measured only, never chosen on)
               \\-> rest --stratified 15%--> validation  (what settings are chosen on)
                        \\-> train                      (training, and statistics collection)

Each split is stratified by label with a fixed seed: every class keeps its share on every side, so a
forget class has the same weight in validation and held-out as in train. Pixels are normalised with
the *train* mean and standard deviation (one scalar each), so nothing about held-out images leaks in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from selprune_core.errors import DatasetError, EmptyDatasetError

__all__ = ["DigitsSplitConfig", "ImageSet", "ImageSplits", "load_digits_splits", "stratified_split"]


@dataclass(frozen=True)
class ImageSet:
    """Images with their labels, in a fixed order."""

    pixels: torch.Tensor  # [n, channels, height, width] float32, normalised
    labels: torch.Tensor  # [n] int64 class ids

    def __post_init__(self) -> None:
        assert self.pixels.ndim == 4, f"pixels must be [n, C, H, W], got {tuple(self.pixels.shape)}"
        assert self.labels.shape == (self.pixels.shape[0],), "one label per image"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def with_labels(self, labels: Iterable[int]) -> ImageSet:
        """The images whose label is in `labels` (e.g. the forget class), order kept."""
        keep = torch.isin(self.labels, torch.tensor(sorted(set(labels)), dtype=torch.long))
        return ImageSet(self.pixels[keep], self.labels[keep])

    def without_labels(self, labels: Iterable[int]) -> ImageSet:
        """The images whose label is not in `labels` (e.g. every class but the forget class)."""
        drop = torch.isin(self.labels, torch.tensor(sorted(set(labels)), dtype=torch.long))
        return ImageSet(self.pixels[~drop], self.labels[~drop])

    def counts(self, n_classes: int) -> list[int]:
        """Images per class [n_classes]."""
        return [int(c) for c in torch.bincount(self.labels, minlength=n_classes)]


@dataclass(frozen=True)
class ImageSplits:
    """Train / validation / held-out images of one data set, normalised alike."""

    name: str
    train: ImageSet  # fits the model; its subsets are what statistics are collected on
    validation: ImageSet  # carved from train: choose anything (epochs, fractions, steps) on this
    heldout: ImageSet  # only ever measured
    n_classes: int
    mean: float  # the train pixel mean and std that every split was normalised with
    std: float

    def split(self, name: str) -> ImageSet:
        sets = {"train": self.train, "validation": self.validation, "heldout": self.heldout}
        if name not in sets:
            raise KeyError(f"no split {name!r}; have {sorted(sets)}")
        return sets[name]


@dataclass(frozen=True)
class DigitsSplitConfig:
    """How the digits are split and shaped; part of a trained model's cache key."""

    heldout_frac: float = 0.3  # share of every class held out
    validation_frac: float = 0.15  # share of every class's remaining (train) images used for validation
    seed: int = 0
    channels: int = 1  # >1 repeats the grey channel (for models built for RGB)


def stratified_split(labels: torch.Tensor, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (rest, taken): `round(frac * n_c)` images of every class c are taken, at random.

    Both index tensors are sorted, so each side keeps the original order.
    """
    g = torch.Generator().manual_seed(seed)
    taken: list[torch.Tensor] = []
    for label in torch.unique(labels).tolist():  # sorted classes: the draw order is fixed
        members = torch.nonzero(labels == label).flatten()  # [n_c]
        n_take = round(frac * len(members))
        taken.append(members[torch.randperm(len(members), generator=g)[:n_take]])
    take = torch.zeros(len(labels), dtype=torch.bool)
    take[torch.cat(taken)] = True
    return torch.nonzero(~take).flatten(), torch.nonzero(take).flatten()


def load_digits_splits(cfg: DigitsSplitConfig | None = None) -> ImageSplits:
    """The 8x8 digits as [n, channels, 8, 8] float32 images, split and normalised (see module docstring)."""
    cfg = cfg if cfg is not None else DigitsSplitConfig()
    try:
        from sklearn.datasets import load_digits  # shipped with scikit-learn: no download
    except ImportError as exc:
        raise DatasetError("the digits images need scikit-learn: pip install 'selprune[vision]'") from exc

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32)[:, None]  # [n, 1, 8, 8], values 0..16
    labels = torch.tensor(digits.target, dtype=torch.long)  # [n]
    if len(labels) == 0:
        raise EmptyDatasetError("the digits data set is empty")
    rest, held = stratified_split(labels, cfg.heldout_frac, cfg.seed)
    # A second, different seed: the validation draw must not mirror the held-out one.
    train_pos, val_pos = stratified_split(labels[rest], cfg.validation_frac, cfg.seed + 1)
    train, val = rest[train_pos], rest[val_pos]
    mean, std = float(pixels[train].mean()), float(pixels[train].std())
    normalised = ((pixels - mean) / std).repeat(1, cfg.channels, 1, 1)  # [n, channels, 8, 8]

    def subset(index: torch.Tensor) -> ImageSet:
        return ImageSet(normalised[index].contiguous(), labels[index].contiguous())

    return ImageSplits(
        name="digits",
        train=subset(train),
        validation=subset(val),
        heldout=subset(held),
        n_classes=int(labels.max()) + 1,
        mean=mean,
        std=std,
    )
