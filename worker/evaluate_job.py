"""The evaluate job: the base model and/or a mask, measured on datasets by the metrics the job names.

- ``next_token``: held-out top-1 / top-k / loss with bootstrap intervals (selprune_core.evaluation).
- ``toxicity``: the toxic-continuation rate of sampled continuations of the held-out texts as prompts.
- ``membership``: the loss attack's AUC, the dataset's first train texts (members: what a prune job on
  this dataset sampled its statistics from) against its held-out texts (selprune_core.membership).
  It means something for the dataset the mask was made to forget.
- ``relearn``: the relearning attack: an fp32 copy of the model is fine-tuned through the mask (its
  hooks stay on, so only kept neurons learn) on the dataset's first train texts for a fixed budget,
  then evaluated on the held-out texts like ``next_token``. The cached model is never touched. Costs
  about 16 bytes per parameter (fp32 weights, gradients and two AdamW moments) on the model's device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from protocol import EvaluateJob, JobProgress
from protocol.jobs import EVAL_BATCH_SIZE
from selprune_core.config import EvalConfig, SamplingConfig, ToxicityConfig
from selprune_core.errors import CancelledError, ConfigError
from selprune_core.evaluation import common_target_ids, evaluate_sets
from selprune_core.finetune import FinetuneConfig, finetune
from selprune_core.loading import LoadedModel
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.membership import membership_inference
from selprune_core.placement import check_weights_resident
from selprune_core.sites import ModelSites, resolve_sites
from selprune_core.splits import TextSplits
from selprune_core.toxicity import get_scorer, toxicity_metric
from worker.context import JobContext
from worker.convert import set_names
from worker.runtime import ModelRuntime

__all__ = ["evaluate_variants", "evaluated_mask", "run_evaluate", "stop_check"]

T = TypeVar("T")  # what one evaluated set holds: texts, images, a masked-token plan


def stop_check(ctx: JobContext, what: str) -> None:
    """CancelledError once the job must stop (cancel requested, or its time is up: the runner tells)."""
    if ctx.should_cancel():
        raise CancelledError(f"{what} stopped")


def evaluated_mask(
    job: EvaluateJob, ctx: JobContext, sites: ModelSites, fingerprint: str
) -> NeuronMask | None:
    """The job's mask, checked against the model it is evaluated on (None without a mask_id);
    ConfigError when there is nothing to evaluate (no mask and no base)."""
    mask = NeuronMask.from_bytes(ctx.load_mask(job.mask_id)) if job.mask_id else None
    if mask is not None:
        mask.check_fits(sites, fingerprint)
    if mask is None and not job.include_base:
        raise ConfigError("nothing to evaluate: give a mask_id or set include_base")
    return mask


def evaluate_variants(
    job: EvaluateJob,
    ctx: JobContext,
    model: nn.Module,
    sites: ModelSites,
    full: NeuronMask,
    mask: NeuronMask | None,
    sets: Mapping[str, T],
    score: Callable[[str, T], dict[str, Any]],
    after: Callable[[str, NeuronMask, dict[str, dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """An evaluate job's result for every model kind: the base model (`full`, when the job includes it)
    and the job's mask (when it has one), each set's metrics by `score` with that variant's mask
    applied; `after` may add to a variant's results once its hooks are off. Checks for a stop
    before every variant and set."""
    variants: dict[str, NeuronMask] = {}
    if job.include_base:
        variants["base"] = full
    if mask is not None:
        variants["masked"] = mask
    out: dict[str, Any] = {"model": job.model, "mask_id": job.mask_id, "results": {}}
    for variant, active in variants.items():
        stop_check(ctx, "evaluation")
        ctx.progress(JobProgress(phase=f"evaluating_{variant}"))
        results: dict[str, dict[str, Any]] = {}
        with apply_mask(model, sites, active):
            for name, data in sets.items():
                stop_check(ctx, "evaluation")
                results[name] = score(name, data)
        if after is not None:
            after(variant, active, results)
        out["results"][variant] = results
    return out


def run_evaluate(job: EvaluateJob, runtime: ModelRuntime, ctx: JobContext) -> dict[str, Any]:
    ctx.progress(JobProgress(phase="loading"))
    loaded = runtime.model(job.model)
    mask = evaluated_mask(job, ctx, loaded.sites, loaded.fingerprint)
    if "relearn" in job.metrics:  # before any work: offloaded weights cannot be copied and trained
        check_weights_resident(loaded.model, "the relearn metric")
    ctx.progress(JobProgress(phase="resolving_data"))
    splits = {
        name: runtime.dataset(s, model_ref=job.model)
        for name, s in zip(set_names(job.datasets), job.datasets, strict=True)
    }
    sets = {name: list(split.heldout) for name, split in splits.items()}
    eval_cfg = EvalConfig(
        token_limit=job.token_limit, sample_tokens=job.eval_tokens, batch_size=EVAL_BATCH_SIZE, seed=job.seed
    )
    # The common-token list of all sets together, as evaluate_sets draws it, computed once so that the
    # sets can be evaluated one at a time with a stop check between them.
    union = [text for texts in sets.values() for text in texts]
    common = common_target_ids(loaded.tokenizer, union, n=eval_cfg.skip_common, token_limit=job.token_limit)

    def score(name: str, texts: list[str]) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if "next_token" in job.metrics:
            one = evaluate_sets(loaded.model, loaded.tokenizer, {name: texts}, eval_cfg, common_ids=common)
            metrics["next_token"] = one[name].as_dict()
        if "toxicity" in job.metrics:
            metrics["toxicity"] = _toxicity(job, loaded, texts)
        if "membership" in job.metrics:
            metrics["membership"] = _membership(job, loaded, splits[name], eval_cfg)
        return metrics

    def relearn(variant: str, active: NeuronMask, results: dict[str, dict[str, Any]]) -> None:
        for name, split in splits.items():
            stop_check(ctx, "evaluation")
            ctx.progress(JobProgress(phase=f"relearning_{variant}"))
            results[name]["relearn"] = _relearn(job, ctx, loaded, active, split, eval_cfg, common)

    full = NeuronMask.full(loaded.sites, loaded.fingerprint)
    after = relearn if "relearn" in job.metrics else None
    return evaluate_variants(job, ctx, loaded.model, loaded.sites, full, mask, sets, score, after)


def _toxicity(job: EvaluateJob, loaded: LoadedModel, prompts: list[str]) -> dict[str, Any]:
    cfg = ToxicityConfig(
        scorer=job.toxicity_scorer,
        samples_per_prompt=job.toxicity_samples_per_prompt,
        sampling=SamplingConfig(max_new_tokens=job.toxicity_max_new_tokens, seed=job.seed),
    )
    result = toxicity_metric(
        loaded.model,
        loaded.tokenizer,
        prompts[: job.toxicity_max_prompts],
        cfg,
        get_scorer(job.toxicity_scorer),
        seed=job.seed,
        batch_size=EVAL_BATCH_SIZE,
    )
    return result.as_dict()


def _membership(job: EvaluateJob, loaded: LoadedModel, split: TextSplits, cfg: EvalConfig) -> dict[str, Any]:
    """Every token of up to `membership_texts` texts on each side (no sampling: the attack scores whole
    texts), truncated at the job's token_limit."""
    n = job.membership_texts
    whole = EvalConfig(
        token_limit=cfg.token_limit, sample_tokens=10**9, batch_size=cfg.batch_size, seed=cfg.seed
    )
    result = membership_inference(loaded.model, loaded.tokenizer, split.train[:n], split.heldout[:n], whole)
    return {
        "auc": result.auc,
        "ci": list(result.ci),
        "n_members": result.n_members,
        "n_nonmembers": result.n_nonmembers,
        "member_loss": result.member_loss,
        "nonmember_loss": result.nonmember_loss,
    }


def _relearn(
    job: EvaluateJob,
    ctx: JobContext,
    loaded: LoadedModel,
    mask: NeuronMask,
    split: TextSplits,
    cfg: EvalConfig,
    common: tuple[int, ...],
) -> dict[str, Any]:
    """Fine-tune an fp32 copy through `mask` on the first `relearn_texts` train texts; its held-out
    next-token metrics (evaluated like `next_token`, same sample) and the training budget spent."""
    texts = split.train[: job.relearn_texts]
    tune = FinetuneConfig(
        steps=job.relearn_steps,
        learning_rate=job.relearn_learning_rate,
        batch_size=min(EVAL_BATCH_SIZE // 2, len(texts)),
        token_limit=job.token_limit,
        seed=job.seed,
    )
    # A copy, in fp32: the shared model stays as it is, and half-precision AdamW steps of this size
    # would mostly round away (which would read as "nothing came back").
    model = _fp32_copy(loaded)
    try:
        sites = resolve_sites(model)
        report = finetune(
            model,
            loaded.tokenizer,
            texts,
            tune,
            sites=sites,
            mask=mask,
            on_step=lambda _: stop_check(ctx, "relearning"),  # a cancel or the time limit lands mid-training
        )
        with apply_mask(model, sites, mask):
            after = evaluate_sets(
                model, loaded.tokenizer, {split.name: list(split.heldout)}, cfg, common_ids=common
            )
    finally:
        del model
    return {
        "after": after[split.name].as_dict(),
        "texts": len(texts),
        "steps": tune.steps,
        "learning_rate": tune.learning_rate,
        "train_tokens": report.tokens,
        "seconds": report.seconds,
    }


def _fp32_copy(loaded: LoadedModel) -> torch.nn.Module:
    model: torch.nn.Module = copy.deepcopy(loaded.model)
    model.to(dtype=torch.float32)
    return model
