"""Job functions: validate, convert to core types, call the core, report, return a small dict.

Each runs the same way under the Redis worker and under `selprune prune` (local): all I/O goes
through the JobContext it is given.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import EvaluateJob, ExportJob, JobProgress, PruneJob
from selprune_core.config import PruneConfig
from selprune_core.errors import ConfigError
from selprune_core.masking import fold_into_weights
from selprune_core.masks import NeuronMask
from selprune_core.placement import check_weights_resident
from selprune_core.prune_measure import PrunableModel
from selprune_core.pruning import PruneCallbacks, PruneOptions, PruneRun, StepReport
from selprune_core.reports import Progress
from selprune_core.sites import resolve_sites
from selprune_core.splits import carve_validation
from worker.context import JobContext, LeaseGuard, PlotSink
from worker.convert import describe_spec, prune_config, set_names
from worker.errors import CheckpointMissingError
from worker.evaluate_job import run_evaluate, stop_check
from worker.image_jobs import StartRun, image_prune_setup, run_image_evaluate
from worker.image_models import LoadedClassifier, write_preprocessor
from worker.mlm_jobs import mlm_prune_setup, run_mlm_evaluate
from worker.runtime import ModelRuntime

log = logging.getLogger(__name__)


def run_job(
    job: PruneJob | EvaluateJob | ExportJob,
    runtime: ModelRuntime,
    ctx: JobContext,
    *,
    export_root: Path = Path("exports"),
) -> dict[str, Any]:
    """Dispatch on the job kind."""
    if isinstance(job, PruneJob):
        return run_prune(job, runtime, ctx)
    if isinstance(job, EvaluateJob):
        if job.images:
            return run_image_evaluate(job, runtime, ctx)
        if runtime.kind(job.model) == "masked_lm":
            return run_mlm_evaluate(job, runtime, ctx)
        if "masked_token" in job.metrics:
            raise ConfigError(f"metric masked_token is for masked LMs; model {job.model!r} is not one")
        return run_evaluate(job, runtime, ctx)
    return run_export(job, runtime, ctx, export_root=export_root)


@dataclass(frozen=True)
class PruneSetup:
    """What a prune job runs: the model it prunes, its config, and how to start its run from the
    options (history, resume mask) and callbacks the job machinery gives it."""

    target: PrunableModel
    cfg: PruneConfig
    start: StartRun


def run_prune(job: PruneJob, runtime: ModelRuntime, ctx: JobContext) -> dict[str, Any]:
    steps = prune_config(job.params).n_steps  # checks the settings before anything loads
    ctx.progress(JobProgress(phase="loading", steps=steps))
    if job.images:
        setup = PruneSetup(*image_prune_setup(job, runtime, ctx))
    elif runtime.kind(job.model) == "masked_lm":
        setup = PruneSetup(*mlm_prune_setup(job, runtime, ctx))
    else:
        setup = _text_setup(job, runtime, ctx)
    return _prune(job, ctx, setup, runtime.kind(job.model))


def _text_setup(job: PruneJob, runtime: ModelRuntime, ctx: JobContext) -> PruneSetup:
    """A causal LM on texts: train texts for statistics, held-out texts for evaluation."""
    cfg = prune_config(job.params)
    loaded = runtime.model(job.model)
    ctx.progress(JobProgress(phase="resolving_data", steps=cfg.n_steps))

    def generating(done: int, total: int) -> None:  # the model's own continuations, the first time
        ctx.progress(JobProgress(phase="generating_continuations", steps=cfg.n_steps, tokens=done))

    forget, retain = (
        runtime.dataset(s, model_ref=job.model, on_progress=generating) for s in (job.forget, job.retain)
    )
    eval_sets: dict[str, tuple[str, ...]] = {"forget": forget.heldout, "retain": retain.heldout}
    specs = job.eval or []
    for name, spec in zip(set_names(specs, taken=eval_sets), specs, strict=True):
        eval_sets[name] = runtime.dataset(spec, model_ref=job.model).heldout
    forget_train, retain_train = forget.train, retain.train
    budget_sets = None
    if cfg.budget is not None:
        # The budget decides which steps are kept, so it reads a validation split carved from the
        # train texts: the held-out texts only ever measure.
        forget_train, forget_val = carve_validation(forget.train)
        retain_train, retain_val = carve_validation(retain.train)
        budget_sets = {"forget": forget_val, "retain": retain_val}

    def start(options: PruneOptions, callbacks: PruneCallbacks) -> PruneRun:
        options = dataclasses.replace(options, budget_sets=budget_sets)
        return PruneRun(loaded, forget_train, retain_train, eval_sets, cfg, options, callbacks)

    return PruneSetup(loaded, cfg, start)


def _prune(job: PruneJob, ctx: JobContext, setup: PruneSetup, model_kind: str) -> dict[str, Any]:
    """Run `setup` to the end through the job context: resume from its checkpoint, report progress,
    record every step with its mask and plot, store the final mask with its metadata."""
    cfg = setup.cfg
    history = [StepReport.from_dict(report) for report in ctx.completed_steps()]
    checkpoint = ctx.checkpoint()
    if history and not checkpoint:  # each step is recorded with its mask; without it, no honest resume
        raise CheckpointMissingError(
            f"job {job.job_id}: {len(history)} completed steps are recorded (the last is step "
            f"{history[-1].step}) but the mask after them is gone; resuming would prune an unpruned model "
            "under later step numbers. Submit the job again."
        )
    resume_mask = NeuronMask.from_bytes(checkpoint) if history and checkpoint else None
    if history:
        log.info("job %s: resuming after step %d", job.job_id, history[-1].step)
    tokens_total = sum(report.tokens_collected for report in history)

    def on_progress(progress: Progress) -> None:
        ctx.progress(
            JobProgress(
                phase=progress.phase,
                step=progress.step,
                steps=cfg.n_steps,
                tokens=progress.tokens,
                tokens_total=tokens_total + progress.tokens,
            )
        )

    steps_so_far = [report.as_dict() for report in history]

    def on_step(report: StepReport, mask: NeuronMask) -> None:
        nonlocal tokens_total
        tokens_total += report.tokens_collected
        ctx.step_done(report.as_dict(), mask.to_bytes())
        steps_so_far.append(report.as_dict())
        if isinstance(ctx, PlotSink):
            _store_plot(ctx, steps_so_far, job)

    options = PruneOptions(history=history, resume_mask=resume_mask)
    callbacks = PruneCallbacks(on_step=on_step, on_progress=on_progress, should_stop=ctx.should_cancel)
    result = setup.start(options, callbacks).run_to_end()
    meta = {
        "name": job.name,
        "job_id": job.job_id,
        "model": job.model,
        "fingerprint": setup.target.fingerprint,
        "data_kind": "images" if job.images else "text",
        "model_kind": model_kind,  # causal_lm, masked_lm or image_classifier
        "forget": describe_spec(job.forget),
        "retain": describe_spec(job.retain),
        "params": job.params.model_dump(mode="json"),
        "stopped_reason": result.stopped_reason,
        "offsets": result.mask.has_offsets,
        "created_at": time.time(),
        "pruned": result.mask.pruned_counts(),
        "trajectory": [_trajectory_row(report) for report in result.history],
    }
    mask_id = ctx.store_mask(result.mask.to_bytes(), meta)
    ctx.progress(
        JobProgress(phase="done", step=result.history[-1].step, steps=cfg.n_steps, tokens_total=tokens_total)
    )
    return {
        "mask_id": mask_id,
        "steps": result.history[-1].step,
        "stopped_reason": result.stopped_reason,
        "pruned": {k: v for k, v in result.mask.pruned_counts().items() if not k.endswith("per_layer")},
    }


def _store_plot(ctx: PlotSink, steps: list[dict[str, Any]], job: PruneJob) -> None:
    """Re-render the job's trade-off plot; a plot is a convenience, so no failure here fails the job."""
    try:
        from worker.plots import render_job_plot  # lazy: matplotlib loads on the first completed step

        title = f"{job.name or job.job_id}: forget {describe_spec(job.forget)}"
        ctx.store_plot(render_job_plot(steps, title=title))
    except Exception:
        log.warning("job %s: could not render or store the plot", job.job_id, exc_info=True)


def _trajectory_row(report: StepReport) -> dict[str, Any]:
    """The compact per-step record kept in mask metadata (top-1/top-k/loss per eval set, counts; for
    images also the top-1 per class of each eval set)."""
    row: dict[str, Any] = {
        "step": report.step,
        "accepted": report.accepted,
        "trial": report.trial,
        "ff_frac": report.ff_frac,
        "attn_frac": report.attn_frac,
        "ff_pruned": report.ff_pruned,
        "attn_pruned": report.attn_pruned,
        "drops": report.drops,
        "budget": {
            k: v
            for k, v in report.budget.items()
            if k in ("forget_drop", "retain_drop", "retain_ppl_increase", "broken")
        },
        "metrics": {
            name: {key: metrics.get(key) for key in ("top1", "topk", "skip_top1", "loss", "perplexity")}
            for name, metrics in report.metrics.items()
        },
    }
    if "per_class" in report.extra:
        row["per_class"] = report.extra["per_class"]
    return row


def run_export(
    job: ExportJob, runtime: ModelRuntime, ctx: JobContext, *, export_root: Path
) -> dict[str, Any]:
    """Write `<export_root>/<mask_id>/`: the model with the mask folded into its weights.

    The checkpoint is written into a hidden folder beside the target and renamed into place at the
    end, while this run still owns the job (`LeaseGuard`): the target is only ever a complete export,
    and a fenced-off worker never replaces it. The result names the folder relative to the export
    root, never a server path.
    """
    mask = NeuronMask.from_bytes(ctx.load_mask(job.mask_id))
    ref = job.model
    if ref is None:
        raise ConfigError("export needs the model the mask was made on")
    ctx.progress(JobProgress(phase="loading"))
    loaded = runtime.loaded(ref)  # a causal LM, a masked LM or an image classifier
    mask.check_fits(loaded.sites, loaded.fingerprint)
    check_weights_resident(loaded.model, "exporting a mask")  # before copying: offloaded weights cannot fold
    stop_check(ctx, "export")
    ctx.progress(JobProgress(phase="exporting"))
    target = export_root / job.mask_id
    export_root.mkdir(parents=True, exist_ok=True)
    staging = export_root / f".{job.mask_id}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir()
    try:
        # Fold into a copy: the cached model is shared by every other job and request.
        model: Any = copy.deepcopy(loaded.model)  # a PreTrainedModel of either kind
        fold_into_weights(model, resolve_sites(model), mask)
        model.save_pretrained(staging)
        if isinstance(loaded, LoadedClassifier):  # no tokenizer: the preprocessing it expects instead
            write_preprocessor(loaded.preprocess, staging)
        else:
            loaded.tokenizer.save_pretrained(staging)
        del model
        stop_check(ctx, "export")
        if isinstance(ctx, LeaseGuard):
            ctx.while_owner(lambda: _move_into_place(staging, target))
        else:
            _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone once renamed; what a failed export left
    return {"path": job.mask_id, "mask_id": job.mask_id, "model": ref}


def _move_into_place(staged: Path, target: Path) -> None:
    """Rename `staged` to `target`: one atomic rename when `target` is free; otherwise the earlier
    export is first renamed aside (and deleted after), so `target` never holds a partial checkpoint."""
    aside: list[Path] = []
    try:
        for _ in range(3):  # a concurrent export of the same mask may take the name in between
            try:
                os.rename(staged, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            aside.append(target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.old"))
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, aside[-1])
        raise OSError(errno.EEXIST, f"export folder {target.name} keeps being replaced; try again")
    finally:
        for old in aside:
            shutil.rmtree(old, ignore_errors=True)
