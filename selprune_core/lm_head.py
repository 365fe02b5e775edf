"""The LM head apart from the decoder body: logits only where a prediction is scored, a slice at a time.

A full forward computes logits for every position of a batch at once: [batch, pos, vocab] in the model
dtype, 805 MB in fp32 for 8 x 512 positions of a 49k vocabulary, including each text's last position and
the padding, which evaluation never reads. Allocations that large are mapped fresh from the OS and
page-faulted on every batch. Evaluation instead runs the body, then applies the head to the positions it
scores, `HEAD_CHUNK` positions at a time.

The split must give the model's own logits. Families that change logits after the head do it through
config fields (Gemma 2/3 soft-cap them, Granite divides them), and every split is checked once per model
against a real forward; a model whose logits differ keeps the full forward.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from selprune_core.partial_forward import decoder_body
from selprune_core.placement import input_device
from selprune_core.site_search import text_config

__all__ = ["HEAD_CHUNK", "SplitHead", "split_head"]

log = logging.getLogger(__name__)

# Positions per head call, [512, vocab] logits (100 MB in fp32 for a 49k vocabulary). On 2 CPU cores the
# head over 4096 positions took 1.65 s in chunks of 512, 2.4 s in chunks of 128 and 1.9 s at once.
HEAD_CHUNK = 512

# One verdict per model object: the split, or None where it does not reproduce the model's logits.
_SPLITS: weakref.WeakKeyDictionary[nn.Module, SplitHead | None] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SplitHead:
    """A causal LM as body + head, and what its forward does to the head's output."""

    body: nn.Module  # base_model: input ids -> last hidden state (final norm included)
    head: nn.Module  # the output embedding
    divide_by: float  # Granite's logits_scaling (1 elsewhere)
    softcap: float | None  # Gemma 2/3's final_logit_softcapping

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [batch, pos, hidden] of the body."""
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden: torch.Tensor = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., vocab] at the positions of `hidden` [..., hidden], as the model's forward gives them."""
        logits: torch.Tensor = self.head(hidden)
        if self.divide_by != 1.0:
            logits = logits / self.divide_by
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def split_head(model: nn.Module) -> SplitHead | None:
    """The model's body and head, checked once against a real forward; None when they cannot stand in
    for it (no separate body or head, or logits that differ)."""
    if model in _SPLITS:
        return _SPLITS[model]
    split = _candidate(model)
    if split is not None and not _agrees(model, split):
        log.info(
            "%s: body + head do not reproduce its logits; evaluation runs full forwards", type(model).__name__
        )
        split = None
    _SPLITS[model] = split
    return split


def _candidate(model: nn.Module) -> SplitHead | None:
    body = decoder_body(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if body is model or not isinstance(head, nn.Module):
        return None
    config = text_config(model)
    softcap = getattr(config, "final_logit_softcapping", None)
    return SplitHead(
        body=body,
        head=head,
        divide_by=float(getattr(config, "logits_scaling", 1.0) or 1.0),
        softcap=float(softcap) if softcap else None,
    )


@torch.no_grad()
def _agrees(model: nn.Module, split: SplitHead) -> bool:
    """Whether the split gives the model's logits on a short input, to the model dtype's precision."""
    vocab = int(getattr(text_config(model), "vocab_size", 0) or 0)
    if vocab < 2:
        return False
    device = input_device(model)
    ids = (torch.arange(3, 3 + 2 * 7, 2, device=device) % vocab)[None]  # [1, 7] arbitrary in-vocab tokens
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # [1, 7, vocab]
        parts = split.logits(split.hidden(ids, mask)).float().to(full.device)
    finally:
        model.train(was_training)
    if parts.shape != full.shape:
        return False
    scale = full.abs().max().clamp_min(1e-6)
    # bf16/fp16 round differently in a differently shaped product; a missing soft-cap or scale does not hide.
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    return bool(((parts - full).abs().max() / scale) <= tolerance)
