"""Gradient steps on a causal LM, optionally through a mask: what the relearning attack and the
gradient-based unlearning baselines share (issue "Is it really gone?").

- `descent` fine-tunes on the texts (the relearning attack: does the capability come back?);
- `ascent` raises their loss (the gradient-ascent baseline);
- `difference` raises the forget loss while lowering the retain loss (the gradient-difference baseline);
- `subtract_task_vector` turns a model fine-tuned on the forget texts into the task-arithmetic baseline:
  base - alpha * (tuned - base).

Training is full fine-tuning with AdamW in place: callers pass a copy of the served model. Through a
mask the hooks stay applied, so a pruned neuron's input is its constant (0 or the retain mean) and no
gradient reaches the weights that only serve it: with weight decay 0 they do not move, and relearning
can only use the neurons the mask kept.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune_core.batching import TokenBatch, iter_token_batches
from selprune_core.errors import ConfigError, EmptyDatasetError
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.placement import input_device
from selprune_core.sites import ModelSites

__all__ = ["FinetuneConfig", "FinetuneReport", "Objective", "finetune", "subtract_task_vector"]

Objective = Literal["descent", "ascent", "difference"]


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 20  # optimizer steps
    learning_rate: float = 1e-5
    batch_size: int = 4  # texts per step (per set, for `difference`)
    token_limit: int = 256  # per-text truncation
    objective: Objective = "descent"
    retain_weight: float = 1.0  # `difference`: weight of the retain descent term
    weight_decay: float = 0.0  # 0 keeps the weights behind pruned neurons exactly where they were
    max_grad_norm: float = 1.0
    seed: int = 0  # the order texts are drawn in

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.token_limit < 2:
            raise ConfigError("finetune needs steps >= 1, batch_size >= 1 and token_limit >= 2")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclass(frozen=True)
class FinetuneReport:
    forget_losses: tuple[float, ...]  # per step: mean cross-entropy per token on that step's forget batch
    retain_losses: tuple[float, ...]  # per step, `difference` only
    tokens: int  # tokens trained on, both sets
    seconds: float


def finetune(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget_texts: Sequence[str],
    cfg: FinetuneConfig,
    *,
    retain_texts: Sequence[str] = (),
    sites: ModelSites | None = None,
    mask: NeuronMask | None = None,
    on_step: Callable[[int], None] | None = None,
) -> FinetuneReport:
    """Train every weight of `model` in place for `cfg.steps` steps on the forget texts (and the retain
    texts for `difference`), through `mask` when given; leaves the model in eval mode, its
    requires_grad flags as they were. `on_step(step)` runs after each optimizer step (1-based) with the
    model in eval mode and no gradient, so it may evaluate checkpoints."""
    if cfg.objective == "difference" and not retain_texts:
        raise ConfigError("the gradient-difference objective needs retain texts")
    if mask is not None and sites is None:
        raise ConfigError("training through a mask needs the model's sites")
    device = input_device(model)
    forget = _cycle(tokenizer, forget_texts, cfg, device, "forget")
    retain = _cycle(tokenizer, retain_texts, cfg, device, "retain") if cfg.objective == "difference" else None
    # Loaded models are frozen (requires_grad off); every weight trains here, and the flags come back after.
    params = list(model.parameters())
    frozen = [not p.requires_grad for p in params]
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    forget_losses: list[float] = []
    retain_losses: list[float] = []
    tokens, start = 0, time.perf_counter()
    model.train()
    try:
        for step in range(cfg.steps):
            optimizer.zero_grad(set_to_none=True)
            masked = (
                apply_mask(model, sites, mask) if mask is not None and sites is not None else nullcontext()
            )
            with masked:
                batch = next(forget)
                loss = _lm_loss(model, batch)
                forget_losses.append(float(loss.detach()))
                objective = loss if cfg.objective == "descent" else -loss
                tokens += int(batch.attention_mask.sum())
                if retain is not None:
                    retain_batch = next(retain)
                    retain_loss = _lm_loss(model, retain_batch)
                    retain_losses.append(float(retain_loss.detach()))
                    objective = objective + cfg.retain_weight * retain_loss
                    tokens += int(retain_batch.attention_mask.sum())
                objective.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            if on_step is not None:
                model.eval()
                with torch.no_grad():
                    on_step(step + 1)
                model.train()
    finally:
        optimizer.zero_grad(set_to_none=True)
        for param, was_frozen in zip(params, frozen, strict=True):
            param.requires_grad_(not was_frozen)
        model.eval()
    return FinetuneReport(tuple(forget_losses), tuple(retain_losses), tokens, time.perf_counter() - start)


@torch.no_grad()
def subtract_task_vector(model: nn.Module, base: nn.Module, tuned: nn.Module, alpha: float = 1.0) -> None:
    """Task arithmetic: set `model`'s weights to base - alpha * (tuned - base), parameter by parameter.
    The three models share one architecture; `model` may be `base` itself."""
    base_params, tuned_params = dict(base.named_parameters()), dict(tuned.named_parameters())
    for name, param in model.named_parameters():
        delta = tuned_params[name].to(param.device) - base_params[name].to(param.device)
        param.copy_(base_params[name].to(param.device) - alpha * delta)


def _lm_loss(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's real tokens (padding is never a target)."""
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)  # [batch, pos]
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels, use_cache=False
    )
    loss: torch.Tensor = out.loss
    return loss


def _cycle(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    cfg: FinetuneConfig,
    device: torch.device,
    name: str,
) -> Iterator[TokenBatch]:
    """Batches of the texts forever, reshuffled (seeded) on every pass."""
    usable = [t for t in texts if t.strip()]
    if not usable:
        raise EmptyDatasetError(f"no {name} text to train on")
    rng = random.Random(cfg.seed)
    while True:
        order = rng.sample(usable, len(usable))
        batches = iter_token_batches(
            tokenizer,
            order,
            token_limit=cfg.token_limit,
            batch_size=cfg.batch_size,
            device=device,
            min_tokens=2,
        )
        first = next(batches, None)
        if first is None:
            raise EmptyDatasetError(f"every {name} text is under 2 tokens: nothing to predict")
        yield first
        yield from batches
