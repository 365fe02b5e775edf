"""A masked LM read through a mask: loading, activation statistics on texts, masked-token evaluation,
and the RunMeasure that lets a PruneRun unlearn a text domain from a RoBERTa or BERT (docs/method.md
§1.4, §6.3).

Statistics follow method.md §6.3: they are collected on *unmasked* text. They reuse the causal path
as it is (`batching.iter_token_batches`, `activations.collect_activations`): padded batches, one text
per row truncated to the token limit, every non-pad position counted (the `<s>`/`[CLS]` and `</s>`
special tokens included, as the authors count BOS; `CollectConfig.skip_first` leaves position 0 out).
The ids go through the model's own embedding module once: the authors' collector fed the embedding
output back in as `inputs_embeds`, adding positions and LayerNorm twice (method.md §9.8); ours never
touches embeddings.

Token limits are clamped to what the model's positions hold (512 for RoBERTa-base, whose positions
start after its pad id), the authors' 512 for RoBERTa. Packing (`CollectConfig.pack`) is refused: a
packed window would start mid-text without `<s>`. Gradient scorings (`taylor*`) are refused too: their
loss is the causal next-token loss.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerBase

from selprune_core.activations import ATTRIBUTION, ActivationStats, collect_activations
from selprune_core.batching import iter_token_batches
from selprune_core.config import EvalConfig, PruneConfig
from selprune_core.errors import ConfigError, EmptyDatasetError, ModelLoadError
from selprune_core.evaluation import EvalResult, result_from_sums
from selprune_core.loading import _LOAD_ERRORS, _SAFE, _SAFE_WEIGHTS
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.mlm_eval import MlmMasking, MlmPlan, common_mlm_targets, mlm_rows, plan_mlm
from selprune_core.placement import input_device
from selprune_core.prune_measure import CollectingMeasure, Evaluated, PruneCallbacks, report_progress
from selprune_core.scoring import OUTPUT_AWARE, required_fields
from selprune_core.sites import ModelSites, model_fingerprint, resolve_sites

__all__ = ["MaskedLM", "MlmMeasure", "load_masked_lm", "masked_lm", "max_tokens"]


@dataclass(frozen=True)
class MaskedLM:
    """A masked LM in eval mode with its tokenizer and hook sites: what a PruneRun prunes."""

    model: nn.Module  # forward(input_ids=[batch, pos], attention_mask=...).logits -> [batch, pos, vocab]
    tokenizer: PreTrainedTokenizerBase  # has a mask token and a pad token
    sites: ModelSites
    fingerprint: str
    device: torch.device  # where token ids go
    max_tokens: int  # the longest input its position embeddings hold


def max_tokens(model: nn.Module) -> int:
    """Tokens per input the position embeddings hold; RoBERTa's positions start at pad id + 1."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    positions = getattr(embeddings, "position_embeddings", None)
    if not isinstance(positions, nn.Embedding):
        raise ModelLoadError(
            f"{type(model).__name__} has no learned position embeddings: not a BERT-style MLM"
        )
    padding_idx = getattr(embeddings, "padding_idx", None)  # set by RoBERTa-style embeddings only
    return int(positions.num_embeddings) - (int(padding_idx) + 1 if padding_idx is not None else 0)


def masked_lm(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> MaskedLM:
    """Wrap a loaded masked LM (e.g. RobertaForMaskedLM) and its tokenizer: eval mode, frozen, sites."""
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise ModelLoadError("a masked LM's tokenizer needs a mask token and a pad token")
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if padding_idx is not None and padding_idx != tokenizer.pad_token_id:
        # RoBERTa numbers positions from the non-pad ids: a different pad id would shift them.
        raise ModelLoadError(f"tokenizer pad id {tokenizer.pad_token_id} is not the model's {padding_idx}")
    model.eval()
    model.requires_grad_(False)
    sites = resolve_sites(model)
    return MaskedLM(model, tokenizer, sites, model_fingerprint(model), input_device(model), max_tokens(model))


def load_masked_lm(
    folder: Path | str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> MaskedLM:
    """A local `*ForMaskedLM` folder (config.json, safetensors weights, tokenizer files) as a MaskedLM.

    Loads as `loading.load_model` does: no remote code, safetensors only; ModelLoadError on failure.
    """
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"masked LM folder {str(folder)!r} has no config.json")
    try:
        model = AutoModelForMaskedLM.from_pretrained(
            path, local_files_only=True, dtype=dtype, **_SAFE_WEIGHTS
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **_SAFE)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load {str(folder)!r} as a masked LM: {exc}") from exc
    module: nn.Module = model
    module.to(device)
    return masked_lm(module, tokenizer)


class MlmMeasure(CollectingMeasure[Sequence[str]]):
    """A run's view of a masked LM: statistics on unmasked forget / retain texts, masked-token
    evaluation of the eval (and budget) sets. Every step scores the same masked positions."""

    def __init__(
        self,
        target: MaskedLM,
        cfg: PruneConfig,
        texts: tuple[Sequence[str], Sequence[str]],  # (forget, retain) texts statistics are collected on
        eval_sets: Mapping[str, Sequence[str]],
        budget_sets: Mapping[str, Sequence[str]] | None = None,  # default: the eval sets
        callbacks: PruneCallbacks | None = None,
        masking: MlmMasking | None = None,
    ) -> None:
        if ATTRIBUTION in required_fields(cfg.ff_scoring, cfg.attn_scoring):
            raise ConfigError("gradient scorings (taylor, taylor_mean) are not supported for masked LMs")
        if cfg.collect.pack:
            raise ConfigError("packed collection is for causal LMs: a masked LM reads one text per row")
        for name, texts_ in {"forget": texts[0], "retain": texts[1]}.items():
            if not texts_:
                raise EmptyDatasetError(f"the {name} texts are empty")
        self.target, self.cfg, self.sites = target, cfg, target.sites
        self.callbacks = callbacks if callbacks is not None else PruneCallbacks()
        self.forget, self.retain = texts
        self.collect_limit = min(cfg.collect.token_limit, target.max_tokens)
        self.eval_limit = min(cfg.eval.token_limit, target.max_tokens)
        self.masking = masking if masking is not None else MlmMasking()
        # No bootstrap on the budget sets: the budget reads point estimates.
        self.budget_eval = EvalConfig(**{**asdict(cfg.eval), "bootstrap_samples": 0})
        self.eval_common, self.eval_plans = self._plans(eval_sets, cfg.eval)
        budget = eval_sets if budget_sets is None else budget_sets
        self.budget_common, self.budget_plans = (
            self._plans(budget, self.budget_eval) if cfg.budget is not None else ((), {})
        )
        needs_norms = {cfg.ff_scoring, cfg.attn_scoring} & OUTPUT_AWARE
        self.out_norms = target.sites.output_norms() if needs_norms else (None, None)

    def _plans(
        self, sets: Mapping[str, Sequence[str]], cfg: EvalConfig
    ) -> tuple[tuple[int, ...], dict[str, MlmPlan]]:
        """The sets' common targets (over their union) and each set masked once."""
        tokenizer = self.target.tokenizer
        union = [text for texts in sets.values() for text in texts]
        common = common_mlm_targets(tokenizer, union, n=cfg.skip_common, token_limit=self.eval_limit)
        plans = {}
        for name, texts in sets.items():
            try:
                plans[name] = plan_mlm(
                    tokenizer,
                    texts,
                    cfg,
                    token_limit=self.eval_limit,
                    masking=self.masking,
                    common_ids=common,
                )
            except EmptyDatasetError as exc:
                raise EmptyDatasetError(f"eval set {name!r}: {exc}") from exc
        return common, plans

    # Statistics and scores -------------------------------------------------------------------
    def collect(
        self, texts: Sequence[str], mask: NeuronMask, step: int, phase: str, which: tuple[str, ...]
    ) -> ActivationStats:
        """Statistics (`which` fields) of the unmasked `texts` through `mask`."""
        target, cfg = self.target, self.cfg.collect
        batches = iter_token_batches(
            target.tokenizer,
            texts,
            token_limit=self.collect_limit,
            batch_size=cfg.batch_size,
            device=target.device,
        )
        report_progress(self.callbacks, step, phase)
        with apply_mask(target.model, target.sites, mask):
            return collect_activations(
                target.model,
                target.sites,
                batches,
                sample_tokens=cfg.sample_tokens,
                skip_first=cfg.skip_first,
                which=which,
                on_batch=functools.partial(report_progress, self.callbacks, step, phase),
            )

    # Evaluation ------------------------------------------------------------------------------
    def _evaluate(
        self, mask: NeuronMask, plans: Mapping[str, MlmPlan], cfg: EvalConfig, common: Sequence[int]
    ) -> dict[str, EvalResult]:
        target = self.target
        with apply_mask(target.model, target.sites, mask):
            return {
                name: result_from_sums(mlm_rows(target.model, plan, cfg, common_ids=common), cfg)
                for name, plan in plans.items()
            }

    def evaluate(self, mask: NeuronMask, step: int) -> Evaluated:
        """Masked-token metrics of every eval set through `mask`, plus the caller's extra metrics."""
        report_progress(self.callbacks, step, "evaluating")
        results = self._evaluate(mask, self.eval_plans, self.cfg.eval, self.eval_common)
        extra: dict[str, Any] = {}
        if self.callbacks.extra_metrics is not None:
            extra.update(self.callbacks.extra_metrics(mask))
        return results, extra

    def evaluate_budget(self, mask: NeuronMask, step: int) -> dict[str, EvalResult]:
        """The budget sets' point estimates through `mask`: what BudgetCheck reads."""
        report_progress(self.callbacks, step, "checking_budget")
        return self._evaluate(mask, self.budget_plans, self.budget_eval, self.budget_common)
