"""The image classifier side of the prune and evaluate jobs.

A prune job whose datasets are images (protocol.ImageData) runs the same job machinery as a text job
(worker/jobs.py: resume from the checkpoint, progress, steps, plots, the stored mask and its
metadata); only what it runs differs: `image_prune_setup` builds a `PruneRun.with_measure` on the
classifier, reading it through `ImageMeasure` (statistics on the train images of the forget and retain
sets, accuracy on their held-out images). An evaluate job on images measures top-1 / top-k accuracy,
cross-entropy with bootstrap intervals, and the top-1 of every class with its Wilson interval, for the
base model and/or a mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from protocol import EvaluateJob, ImageData, JobProgress, PruneJob
from selprune_core.config import PruneConfig
from selprune_core.errors import ConfigError
from selprune_core.image_measure import (
    ImageClassifier,
    ImageEval,
    ImageMeasure,
    evaluate_images,
    tokens_per_image,
)
from selprune_core.images import ImageSet
from selprune_core.pruning import PruneCallbacks, PruneOptions, PruneRun
from selprune_core.toxicity import wilson_interval
from worker.context import JobContext
from worker.convert import image_eval_config, image_prune_config, set_names
from worker.evaluate_job import evaluate_variants, evaluated_mask
from worker.image_models import LoadedClassifier
from worker.runtime import DatasetSpecModel, ModelRuntime

__all__ = ["EVAL_IMAGE_BATCH", "StartRun", "image_prune_setup", "run_image_evaluate"]

EVAL_IMAGE_BATCH = 64  # images per forward pass of an evaluation job
# How a prune job starts its run, given the options (history, resume mask) and callbacks of the job.
StartRun = Callable[[PruneOptions, PruneCallbacks], PruneRun]


def _images(spec: DatasetSpecModel) -> ImageData:
    if not isinstance(spec, ImageData):  # the payload's validator allows no mix; this is for the types
        raise ConfigError("a job on images reads image datasets only")
    return spec


def image_prune_setup(
    job: PruneJob, runtime: ModelRuntime, ctx: JobContext
) -> tuple[ImageClassifier, PruneConfig, StartRun]:
    """The classifier a job prunes, its config, and how to start its run."""
    classifier = runtime.classifier(job.model)
    cfg = image_prune_config(job.params, classifier.n_classes)
    positions = tokens_per_image(classifier.model)
    if cfg.collect.skip_first >= positions:
        raise ConfigError(
            f"params.skip_first ({cfg.collect.skip_first}) leaves none of the {positions} positions of an "
            f"image of {job.model!r} to count (1 leaves out CLS)"
        )
    ctx.progress(JobProgress(phase="resolving_data", steps=cfg.n_steps))
    forget, retain = (runtime.image_dataset(_images(s), classifier) for s in (job.forget, job.retain))
    eval_sets: dict[str, ImageSet] = {"forget": forget.heldout, "retain": retain.heldout}
    specs = job.eval or []
    for name, spec in zip(set_names(specs, taken=eval_sets), specs, strict=True):
        eval_sets[name] = runtime.image_dataset(_images(spec), classifier).heldout
    target = classifier.target

    def start(options: PruneOptions, callbacks: PruneCallbacks) -> PruneRun:
        measure = ImageMeasure(target, cfg, (forget.train, retain.train), eval_sets, callbacks)
        return PruneRun.with_measure(target, measure, eval_sets, cfg, options, callbacks)

    return target, cfg, start


def run_image_evaluate(job: EvaluateJob, runtime: ModelRuntime, ctx: JobContext) -> dict[str, Any]:
    """Accuracy of the base model and/or a mask on the held-out images of each dataset."""
    ctx.progress(JobProgress(phase="loading"))
    classifier = runtime.classifier(job.model)
    mask = evaluated_mask(job, ctx, classifier.sites, classifier.fingerprint)
    ctx.progress(JobProgress(phase="resolving_data"))
    sets = {
        name: runtime.image_dataset(_images(s), classifier).heldout
        for name, s in zip(set_names(job.datasets), job.datasets, strict=True)
    }
    cfg = image_eval_config(classifier.n_classes, EVAL_IMAGE_BATCH, job.seed)

    def score(_name: str, images: ImageSet) -> dict[str, Any]:
        evaluated = evaluate_images(classifier.model, images, cfg, classifier.n_classes)
        return {"accuracy": accuracy_dict(evaluated, images, classifier)}

    return evaluate_variants(
        job, ctx, classifier.model, classifier.sites, classifier.full_mask(), mask, sets, score
    )


def accuracy_dict(evaluated: ImageEval, images: ImageSet, classifier: LoadedClassifier) -> dict[str, Any]:
    """Overall metrics (top-1, top-k, loss with bootstrap intervals) and, per class present, its top-1
    with a 95% Wilson interval."""
    counts = images.counts(classifier.n_classes)
    per_class = []
    for class_id, (top1, n) in enumerate(zip(evaluated.per_class, counts, strict=True)):
        if top1 is None or n == 0:
            continue
        hits = round(top1 * n)
        per_class.append(
            {
                "class_id": class_id,
                "label": classifier.labels[class_id],
                "n_images": n,
                "top1": top1,
                "ci": list(wilson_interval(hits, n)),
            }
        )
    return {**evaluated.result.as_dict(), "n_images": len(images), "per_class": per_class}
