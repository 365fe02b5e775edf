"""Image classifiers in the worker, on a tiny random-init ViT saved as a checkpoint folder: one model
cache for both kinds with clear errors for the wrong kind, image datasets resolved and split as the core
splits the digits, and the prune, evaluate and export jobs run through the job functions the worker runs
(progress, steps, plots, resume from a checkpoint, mask metadata, per-class accuracy, a reloadable export).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification

from protocol import VIT_DIGITS_MODEL, EvaluateJob, ExportJob, ImageData, JobProgress, PruneJob
from selprune_core.errors import CancelledError, ConfigError, DatasetError, ModelLoadError
from selprune_core.images import load_digits_splits
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.vision_model import VitRecipe
from tests.helpers import build_vit, local_runtime, random_mask
from worker.image_models import preprocess
from worker.jobs import run_job
from worker.runtime import ModelRuntime

FORGET = {"kind": "images", "source": "builtin:digits", "labels": [0]}
RETAIN = {"kind": "images", "source": "builtin:digits", "exclude_labels": [0]}
PARAMS = {"steps": 2, "ff_frac": 0.05, "attn_frac": 0.02, "batch_size": 64, "collect_tokens": 2000}


class MemoryContext:
    """A JobContext (with a plot sink) in memory; `cancel_after` steps, it asks the job to stop."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.progress_seen: list[JobProgress] = []
        self.steps: list[dict[str, Any]] = []
        self.saved: bytes | None = None
        self.masks: dict[str, tuple[bytes, dict[str, Any]]] = {}
        self.plots: list[bytes] = []
        self.cancel_after = cancel_after

    def progress(self, progress: JobProgress) -> None:
        self.progress_seen.append(progress)

    def step_done(self, report: dict[str, Any], checkpoint: bytes) -> None:
        self.steps.append(report)
        self.saved = checkpoint

    def completed_steps(self) -> list[dict[str, Any]]:
        return list(self.steps)

    def checkpoint(self) -> bytes | None:
        return self.saved

    def should_cancel(self) -> bool:
        return self.cancel_after is not None and len(self.steps) > self.cancel_after

    def store_mask(self, mask_bytes: bytes, meta: dict[str, Any]) -> str:
        mask_id = NeuronMask.from_bytes(mask_bytes).mask_id
        self.masks[mask_id] = (mask_bytes, meta)
        return mask_id

    def load_mask(self, mask_id: str) -> bytes:
        return self.masks[mask_id][0]

    def store_plot(self, png: bytes) -> None:
        self.plots.append(png)


@pytest.fixture
def vit_dir(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "vit"
    build_vit().save_pretrained(path)
    return path


@pytest.fixture
def runtime(tmp_path: Path) -> ModelRuntime:
    return local_runtime(tmp_path)


def test_one_cache_holds_both_kinds_and_the_wrong_kind_is_a_config_error(
    runtime, vit_dir, tiny_model, tokenizer
):
    text_dir = vit_dir.parent / "llama"
    tiny_model("llama").save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    classifier = runtime.classifier("vit")  # relative to the models root, as text models are
    assert classifier.n_classes == 10 and classifier.preprocess.channels == 1
    assert runtime.model("llama").ref == "llama"
    assert runtime.loaded_models() == ["vit", "llama"]  # one LRU cache
    with pytest.raises(ConfigError, match="'vit' is an image classifier"):
        runtime.model("vit")
    with pytest.raises(ConfigError, match="'llama' is a language model"):
        runtime.classifier("llama")
    with pytest.raises(ConfigError, match="image datasets are read by image classifiers"):
        runtime.dataset(ImageData.model_validate(FORGET))


def test_an_image_classifier_outside_the_models_root_is_not_available(runtime, tmp_path):
    build_vit().save_pretrained(tmp_path / "elsewhere")
    for ref in (str(tmp_path / "elsewhere"), "../elsewhere"):
        with pytest.raises(ModelLoadError, match="is not available"):
            runtime.classifier(ref)


def test_builtin_digits_split_as_the_core_splits_them_and_preprocess_to_its_normalisation(tmp_path):
    recipe = VitRecipe(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_steps=2
    )
    runtime = ModelRuntime(
        cache_dir=tmp_path, data_root=tmp_path, device="cpu", dtype="float32", digits_recipe=recipe
    )
    classifier = runtime.classifier(VIT_DIGITS_MODEL)
    sets = runtime.image_dataset(ImageData(source="builtin:digits"), classifier)
    core = load_digits_splits(recipe.split)
    for name in ("train", "validation", "heldout"):
        mine, theirs = getattr(sets, name), core.split(name)
        assert torch.equal(mine.labels, theirs.labels)
        torch.testing.assert_close(mine.pixels, theirs.pixels, atol=1e-5, rtol=0)
    three = runtime.image_dataset(ImageData(source="builtin:digits", labels=[3]), classifier)
    assert torch.equal(three.heldout.pixels, sets.heldout.with_labels([3]).pixels)


def test_npz_images_are_read_scaled_and_checked(runtime, vit_dir, tmp_path):
    classifier = runtime.classifier("vit")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 10)
    grey = rng.integers(0, 256, (100, 16, 16), dtype=np.uint8)  # [N, H, W], resized to 8x8
    np.savez(tmp_path / "grey.npz", images=grey, labels=labels)
    rgb = rng.random((100, 3, 8, 8)).astype(np.float32)  # [N, C, H, W], converted to grey
    np.savez(tmp_path / "rgb.npz", images=rgb, labels=labels)
    grey_sets = runtime.image_dataset(ImageData(source="grey.npz", exclude_labels=[9]), classifier)
    assert grey_sets.heldout.pixels.shape[1:] == (1, 8, 8) and 9 not in grey_sets.heldout.labels.tolist()
    assert len(grey_sets.heldout) == 27  # 30% of each of the 9 classes left
    rgb_sets = runtime.image_dataset(ImageData(source="rgb.npz"), classifier)
    expected = preprocess(torch.from_numpy(rgb), classifier.preprocess)
    index = [int(i) for i in np.flatnonzero(labels == 0)]
    assert any(torch.equal(rgb_sets.train.pixels[0], expected[i]) for i in index)

    np.savez(tmp_path / "raw.npz", images=rgb * 16, labels=labels)  # floats beyond [0, 1]
    np.savez(tmp_path / "many.npz", images=grey, labels=labels + 5)  # labels past the model's classes
    np.savez(tmp_path / "objects.npz", images=np.array([None] * 100, dtype=object), labels=labels)
    for source, message in [
        ("raw.npz", "intensities in \\[0, 1\\]"),
        ("many.npz", "labels run to 14"),
        ("objects.npz", "not a readable .npz"),
        ("missing.npz", "not found under the data root"),
        ("../x.npz", "relative path"),
    ]:
        with pytest.raises(DatasetError, match=message):
            runtime.image_dataset(ImageData(source=source), classifier)
    with pytest.raises(DatasetError, match="outside the model's 0..9"):
        runtime.image_dataset(ImageData(source="grey.npz", labels=[12]), classifier)


def _prune_job(**params: Any) -> PruneJob:
    return PruneJob.model_validate(
        {
            "job_id": "j",
            "tenant": "t",
            "model": "vit",
            "forget": FORGET,
            "retain": RETAIN,
            "params": PARAMS | params,
        }
    )


def test_an_image_prune_job_reports_steps_stores_a_mask_and_resumes_exactly(runtime, vit_dir):
    ctx = MemoryContext()
    out = run_job(_prune_job(), runtime, ctx)
    assert out["steps"] == 2 and out["stopped_reason"] == "steps" and out["pruned"]["ff"] > 0
    assert [s["step"] for s in ctx.steps] == [0, 1, 2] and len(ctx.plots) == 3
    assert {"loading", "resolving_data", "collecting_retain", "collecting_forget", "done"} <= {
        p.phase for p in ctx.progress_seen
    }
    _bits, meta = ctx.masks[out["mask_id"]]
    assert meta["data_kind"] == "images" and meta["forget"] == "images:builtin:digits[0]"
    assert meta["fingerprint"] == runtime.classifier("vit").fingerprint and len(meta["trajectory"]) == 3
    assert len(meta["trajectory"][0]["per_class"]["forget"]) == 10  # top-1 per class of each eval set

    # Stopped after step 1 and resumed: the same steps and the same mask as the run without a stop.
    interrupted = MemoryContext(cancel_after=1)
    with pytest.raises(CancelledError):
        run_job(_prune_job(), runtime, interrupted)
    assert [s["step"] for s in interrupted.steps] == [0, 1]
    interrupted.cancel_after = None
    resumed = run_job(_prune_job(), runtime, interrupted)
    assert resumed["mask_id"] == out["mask_id"]
    assert [s["mask_id"] for s in interrupted.steps] == [s["mask_id"] for s in ctx.steps]


def test_an_image_prune_job_refuses_what_images_cannot_do(runtime, vit_dir):
    with pytest.raises(ConfigError, match="skip_first"):
        run_job(_prune_job(skip_first=17, token_limit=32), runtime, MemoryContext())
    text_job = PruneJob.model_validate(
        {
            "job_id": "j",
            "tenant": "t",
            "model": "vit",
            "forget": {"kind": "inline", "texts": ["a"]},
            "retain": {"kind": "inline", "texts": ["b"]},
        }
    )
    with pytest.raises(ConfigError, match="is an image classifier"):
        run_job(text_job, runtime, MemoryContext())


def test_image_evaluation_gives_overall_and_per_class_accuracy_with_intervals(runtime, vit_dir):
    classifier = runtime.classifier("vit")
    mask = random_mask(classifier.model, seed=1, frac=0.5)
    ctx = MemoryContext()
    ctx.masks[mask.mask_id] = (mask.to_bytes(), {})
    job = EvaluateJob.model_validate(
        {"job_id": "e", "tenant": "t", "model": "vit", "mask_id": mask.mask_id, "datasets": [RETAIN]}
    )
    out = run_job(job, runtime, ctx)
    base = out["results"]["base"]["images:builtin:digits[-0]"]["accuracy"]
    masked = out["results"]["masked"]["images:builtin:digits[-0]"]["accuracy"]
    assert base["n_images"] == masked["n_images"] == 486 and base["loss"] != masked["loss"]
    assert len(base["ci"]["top1"]) == 2 and base["ci"]["top1"][0] <= base["top1"] <= base["ci"]["top1"][1]
    assert [c["class_id"] for c in base["per_class"]] == list(range(1, 10))  # class 0 was excluded
    for row in base["per_class"]:
        assert row["ci"][0] <= row["top1"] <= row["ci"][1] and row["label"] == f"LABEL_{row['class_id']}"
    hits = sum(round(c["top1"] * c["n_images"]) for c in masked["per_class"])
    assert hits == round(masked["top1"] * masked["n_images"])


def test_an_exported_image_classifier_reloads_with_the_hooked_models_logits(runtime, vit_dir, tmp_path):
    classifier = runtime.classifier("vit")
    mask = dataclasses.replace(random_mask(classifier.model, seed=2, frac=0.4))
    ctx = MemoryContext()
    ctx.masks[mask.mask_id] = (mask.to_bytes(), {})
    out = run_job(
        ExportJob(job_id="x", tenant="t", mask_id=mask.mask_id, model="vit"),
        runtime,
        ctx,
        export_root=tmp_path / "exports",
    )
    folder = tmp_path / "exports" / out["path"]
    assert (folder / "preprocessor_config.json").is_file() and not (folder / "tokenizer.json").exists()
    exported = AutoModelForImageClassification.from_pretrained(folder)
    exported.eval()
    pixels = runtime.image_dataset(ImageData(source="builtin:digits"), classifier).heldout.pixels[:32]
    with torch.no_grad(), apply_mask(classifier.model, classifier.sites, mask):
        hooked = classifier.model(pixel_values=pixels).logits
    with torch.no_grad():
        folded = exported(pixel_values=pixels).logits
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-5)
    reloaded = ModelRuntime(cache_dir=tmp_path, data_root=tmp_path, device="cpu", dtype="float32")
    assert reloaded.classifier(str(folder)).preprocess == classifier.preprocess  # the export carries it
