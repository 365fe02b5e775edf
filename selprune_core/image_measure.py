"""An image classifier read through a mask: activation statistics on image batches, accuracy with
bootstrap intervals, and the RunMeasure that lets a PruneRun unlearn a class (docs/method.md §2, §6.4).

Statistics reuse the text path's recorders (`activations.record_activations`): the same pre-hooks on
the FF and attention pre-out sites, the same float64 running sums. Only the batches differ: a "token"
is a ViT sequence position, CLS + patches, and the label plays no part.

Which tokens count: every position, CLS included, as the authors count every position (197 tokens per
ViT-B image, docs/method.md §2). In a classifier the CLS token is the one the head reads, so its neurons
carry the class evidence that unlearning must remove; leaving it out would hide exactly those from the
scores. `CollectConfig.skip_first = 1` leaves it out (CLS is position 0 of every image), as it leaves
out BOS on text.

Evaluation scores one prediction per image: top-1 accuracy, top-k (k = `EvalConfig.topk`; use 3 for ten
classes, where the text default of 10 is always 1), mean cross-entropy and exp(loss). Rows have the
text path's column layout, so the same `result_from_sums` and bootstrap make the EvalResult: a unit is
an image (n_tokens = n_texts = images), and with no common-token list every target counts as a "skip"
target, so skip_top1 = top1 and skip_topk = topk, the authors' `skip == base` for vision. Every image
of a set is evaluated: EvalConfig's token_limit, sample_tokens and skip_common apply to text only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selprune_core.activations import (
    ATTRIBUTION,
    STAT_FIELDS,
    ActivationStats,
    ComponentStats,
    record_activations,
)
from selprune_core.config import EvalConfig, PruneConfig
from selprune_core.errors import ConfigError, EmptyDatasetError
from selprune_core.evaluation import TOP1, EvalResult, prediction_stats, result_from_sums
from selprune_core.images import ImageSet
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.placement import input_device
from selprune_core.prune_measure import CollectingMeasure, Evaluated, PruneCallbacks, report_progress
from selprune_core.scoring import OUTPUT_AWARE, required_fields
from selprune_core.sites import ModelSites, model_fingerprint, resolve_sites

__all__ = [
    "ImageClassifier",
    "ImageEval",
    "ImageMeasure",
    "collect_image_activations",
    "evaluate_images",
    "image_classifier",
    "image_rows",
    "tokens_per_image",
]


@dataclass(frozen=True)
class ImageClassifier:
    """A ViT-style image classifier in eval mode, with its hook sites: what a PruneRun prunes."""

    model: nn.Module  # forward(pixel_values=[batch, C, H, W]).logits -> [batch, n_classes]
    sites: ModelSites
    fingerprint: str
    n_classes: int


def image_classifier(model: nn.Module) -> ImageClassifier:
    """Wrap a loaded classifier (e.g. ViTForImageClassification): eval mode, sites, fingerprint."""
    model.eval()
    n_classes = int(getattr(model.config, "num_labels", 0))
    return ImageClassifier(model, resolve_sites(model), model_fingerprint(model), n_classes)


def tokens_per_image(model: nn.Module) -> int:
    """Sequence positions per image: the patches plus CLS ((8 / 2)^2 + 1 = 17 for the digits ViT)."""
    config: Any = getattr(model, "config")  # noqa: B009 (a PreTrainedModel's config is untyped here)
    return (int(config.image_size) // int(config.patch_size)) ** 2 + 1


def _batches(images: ImageSet, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(images), batch_size):
        yield images.pixels[start : start + batch_size], images.labels[start : start + batch_size]


@torch.no_grad()
def collect_image_activations(
    model: nn.Module,
    sites: ModelSites,
    images: ImageSet,
    *,
    batch_size: int,
    sample_tokens: int,
    skip_first: int = 0,
    which: Iterable[str] = STAT_FIELDS,
    on_batch: Callable[[int], None] | None = None,
) -> ActivationStats:
    """Statistics of every counted position of `images` (all but the first `skip_first` of each image).

    Like `collect_activations`, stops once more than `sample_tokens` positions were counted, keeping
    the whole last batch; `n_texts` counts images.
    """
    model.eval()
    which = tuple(which)
    assert set(which) <= set(STAT_FIELDS), f"image statistics take running sums only, got {which}"
    if len(images) == 0:
        raise EmptyDatasetError("no images to collect statistics on")
    device = input_device(model)
    ff = ComponentStats.zeros(sites.n_layers, sites.d_mlp, which, device)
    attn = ComponentStats.zeros(sites.n_layers, sites.d_attn, which, device)
    seq = tokens_per_image(model)
    n_images = 0
    with record_activations(sites, ff, attn) as recorders:
        for pixels, _labels in _batches(images, batch_size):
            weight = torch.ones(len(pixels), seq, dtype=torch.float64, device=device)  # [batch, pos]
            weight[:, :skip_first] = 0.0  # position 0 is CLS
            for recorder in recorders:
                recorder.token_weight = weight.reshape(-1)  # [batch * pos], the hooked inputs' row order
            model(pixel_values=pixels.to(device))
            counted = int(weight.sum().item())
            ff.n += counted
            attn.n += counted
            n_images += len(pixels)
            if on_batch is not None:
                on_batch(ff.n)
            if ff.n > sample_tokens:
                break
    return ActivationStats(ff=ff, attn=attn, n_texts=n_images)


@torch.no_grad()
def image_rows(model: nn.Module, images: ImageSet, *, topk: int, batch_size: int) -> torch.Tensor:
    """One row of prediction sums per image [image, N_STATS] float64, in the images' order."""
    model.eval()
    device = input_device(model)
    no_common = torch.zeros(0, dtype=torch.long, device=device)  # every label is a "skip" target
    rows = []
    for pixels, labels in _batches(images, batch_size):
        logits = model(pixel_values=pixels.to(device)).logits  # [batch, n_classes]
        rows.append(prediction_stats(logits, labels.to(device), no_common, topk).cpu())
    return torch.cat(rows)


@dataclass(frozen=True)
class ImageEval:
    """An image set's metrics, its accuracy per class and the per-image rows they came from."""

    result: EvalResult
    per_class: list[float | None]  # [n_classes] top-1 per true class; None where the set has none
    rows: torch.Tensor  # [image, N_STATS]


def evaluate_images(model: nn.Module, images: ImageSet, cfg: EvalConfig, n_classes: int) -> ImageEval:
    """Accuracy (top-1, top-`cfg.topk`), cross-entropy and 95% bootstrap intervals over images."""
    if len(images) == 0:
        raise EmptyDatasetError("no images to evaluate")
    rows = image_rows(model, images, topk=cfg.topk, batch_size=cfg.batch_size)  # [image, N_STATS]
    hits = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, images.labels, rows[:, TOP1])
    seen = torch.bincount(images.labels, minlength=n_classes)  # [n_classes]
    per_class = [float(h / n) if n > 0 else None for h, n in zip(hits.tolist(), seen.tolist(), strict=True)]
    return ImageEval(result_from_sums(rows, cfg), per_class, rows)


class ImageMeasure(CollectingMeasure[ImageSet]):
    """A run's view of an image classifier: collect on forget / retain images, evaluate named image sets.

    Fixed-fraction steps, static mode, mean ablation and the random baseline work as on text; a budget
    (which needs budget sets read per trial) and gradient scorings ("taylor*") are not supported here.
    """

    def __init__(
        self,
        target: ImageClassifier,
        cfg: PruneConfig,
        data: tuple[ImageSet, ImageSet],  # (forget, retain) images statistics are collected on
        eval_sets: Mapping[str, ImageSet],
        callbacks: PruneCallbacks | None = None,
    ) -> None:
        if cfg.budget is not None:
            raise ConfigError("a retain budget is not supported for image classifiers; use fixed steps")
        if ATTRIBUTION in required_fields(cfg.ff_scoring, cfg.attn_scoring):
            raise ConfigError("gradient scorings (taylor, taylor_mean) are not supported for images")
        for name, images in {"forget": data[0], "retain": data[1], **eval_sets}.items():
            if len(images) == 0:
                raise EmptyDatasetError(f"image set {name!r} is empty")
        self.target, self.cfg, self.sites = target, cfg, target.sites
        self.callbacks = callbacks if callbacks is not None else PruneCallbacks()
        self.forget, self.retain = data
        self.eval_sets = eval_sets
        needs_norms = {cfg.ff_scoring, cfg.attn_scoring} & OUTPUT_AWARE
        self.out_norms = target.sites.output_norms() if needs_norms else (None, None)

    def collect(
        self, images: ImageSet, mask: NeuronMask, step: int, phase: str, which: tuple[str, ...]
    ) -> ActivationStats:
        """Statistics (`which` fields) of `images` through `mask`."""
        target, cfg = self.target, self.cfg.collect
        report_progress(self.callbacks, step, phase)
        with apply_mask(target.model, target.sites, mask):
            return collect_image_activations(
                target.model,
                target.sites,
                images,
                batch_size=cfg.batch_size,
                sample_tokens=cfg.sample_tokens,
                skip_first=cfg.skip_first,
                which=which,
                on_batch=functools.partial(report_progress, self.callbacks, step, phase),
            )

    def evaluate_all(self, mask: NeuronMask, step: int) -> dict[str, ImageEval]:
        """Every eval set through `mask`, with per-class accuracy and per-image rows."""
        report_progress(self.callbacks, step, "evaluating")
        target = self.target
        with apply_mask(target.model, target.sites, mask):
            return {
                name: evaluate_images(target.model, images, self.cfg.eval, target.n_classes)
                for name, images in self.eval_sets.items()
            }

    def evaluate(self, mask: NeuronMask, step: int) -> Evaluated:
        """The EvalResult per set; the extra metrics hold each set's per-class accuracy."""
        evaluated = self.evaluate_all(mask, step)
        extra: dict[str, Any] = {"per_class": {name: e.per_class for name, e in evaluated.items()}}
        if self.callbacks.extra_metrics is not None:
            extra.update(self.callbacks.extra_metrics(mask))
        return {name: e.result for name, e in evaluated.items()}, extra

    def evaluate_budget(self, mask: NeuronMask, step: int) -> dict[str, EvalResult]:
        raise ConfigError("a retain budget is not supported for image classifiers")  # refused in __init__
