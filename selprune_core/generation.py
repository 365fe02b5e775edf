"""Batched text generation with our own decoding loop.

We do not call `model.generate`: the serving path applies per-row masks through forward pre-hooks and
per-row sampling settings, so the loop must keep every row at a fixed batch index for the whole
generation and expose one sampling step as a pure function (`sample_next`).

Prompts are left-padded, so every row's next token sits in the last column. Position ids count only
real tokens, as `model.generate` computes them, and finished rows keep being fed padding (their output
is ignored) so the batch shape and the KV cache stay rectangular.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune_core.config import SamplingConfig

__all__ = ["Generation", "generate", "sample_next", "apply_chat_template"]

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Generation:
    """One completion. `token_ids` are the generated tokens, without the prompt and without EOS."""

    text: str  # decoded completion, cut before the first stop string
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason  # "stop": EOS or a stop string; "length": max_new_tokens reached


def _per_row(
    value: float | torch.Tensor, rows: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Broadcast a scalar or [batch] setting to a [batch] tensor."""
    if isinstance(value, torch.Tensor):
        assert value.numel() in (1, rows), f"per-row setting has {value.numel()} values for {rows} rows"
        return value.to(device=device, dtype=dtype).reshape(-1).expand(rows)
    return torch.full((rows,), value, device=device, dtype=dtype)


def sample_next(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor,
    top_p: float | torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from last-position logits [batch, vocab]; returns ids [batch].

    Each setting is a scalar or a [batch] tensor. Rows with temperature 0 are greedy. The others are
    sampled from softmax(logits / temperature), restricted first to the `top_k` largest logits (0 = off,
    ties at the k-th value kept) and then to the smallest set of most likely tokens holding `top_p`
    of the mass (1 = off), the same filters and order as Hugging Face's warpers.
    """
    logits = logits.float()  # [batch, vocab]
    rows, vocab = logits.shape
    temp = _per_row(temperature, rows, logits.device, torch.float32)  # [batch]
    k = _per_row(top_k, rows, logits.device, torch.long)  # [batch]
    p = _per_row(top_p, rows, logits.device, torch.float32)  # [batch]
    greedy = logits.argmax(dim=-1)  # [batch]
    sampled_rows = temp > 0  # [batch]
    if not bool(sampled_rows.any()):
        return greedy

    # Greedy rows are divided by 1 so they stay finite; their sample is discarded below.
    scaled = logits / torch.where(sampled_rows, temp, torch.ones_like(temp))[:, None]  # [batch, vocab]
    # Work in descending order: position j of a row holds its (j+1)-th most likely token.
    sorted_vals, sorted_idx = scaled.sort(dim=-1, descending=True, stable=True)  # [batch, vocab] each

    # top-k: drop every logit strictly below the k-th largest one.
    k_eff = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k)  # [batch]
    kth = sorted_vals.gather(1, (k_eff - 1)[:, None])  # [batch, 1]
    remove = sorted_vals < kth  # [batch, vocab]

    # top-p on what top-k left: drop a token once the more likely tokens already hold top_p of the mass.
    # The most likely token has zero mass above it and is always kept, since top_p > 0.
    probs = sorted_vals.masked_fill(remove, float("-inf")).softmax(dim=-1)  # [batch, vocab]
    mass_above = probs.cumsum(dim=-1) - probs  # [batch, vocab]
    remove |= (mass_above >= p[:, None]) & (p < 1)[:, None]

    probs = sorted_vals.masked_fill(remove, float("-inf")).softmax(dim=-1)  # [batch, vocab]
    choice = torch.multinomial(probs, 1, generator=generator)  # [batch, 1] index in sorted order
    sampled = sorted_idx.gather(1, choice).squeeze(1)  # [batch] token ids
    return torch.where(sampled_rows, sampled, greedy)


def _eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokenizer's EOS plus any the generation config adds (chat models often end turns differently)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_config = getattr(model, "generation_config", None)
    extra = getattr(gen_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, list | tuple):
        ids.update(int(i) for i in extra)
    return ids


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert isinstance(text, str), f"decode returned {type(text).__name__}, expected str"
    return text


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cuts = [pos for pos in (text.find(s) for s in stops if s) if pos >= 0]
    if not cuts:
        return text, False
    return text[: min(cuts)], True


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    cfg: SamplingConfig,
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> list[Generation]:
    """Complete every prompt, `batch_size` at a time, in input order.

    With `cfg.seed` set, one generator seeded once drives the whole call, so the same prompts, seed
    and batch size give the same texts. Pass `add_special_tokens=False` for prompts that already carry
    BOS (chat templates usually do).
    """
    assert batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"
    model.eval()
    device = next(model.parameters()).device
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        results.extend(_generate_batch(model, tokenizer, batch, cfg, generator, device, add_special_tokens))
    return results


def _generate_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    cfg: SamplingConfig,
    generator: torch.Generator | None,
    device: torch.device,
    add_special_tokens: bool,
) -> list[Generation]:
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = int(pad_id) if pad_id is not None else 0
    # An empty prompt still needs one input token: start from BOS (or EOS, as GPT-2 does).
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id
    encoded = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    encoded = [list(ids) if len(ids) > 0 else [int(start_id)] for ids in encoded]

    # Left-pad by hand, leaving the tokenizer's padding_side alone (it is shared with other callers).
    rows, width = len(encoded), max(len(ids) for ids in encoded)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)  # [batch, prompt]
    attention_mask = torch.zeros((rows, width), dtype=torch.long)  # [batch, prompt]
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # Positions count real tokens only, so a padded row sees the same positions as it would alone.
    position_ids = (attention_mask.cumsum(dim=-1) - 1).masked_fill(attention_mask == 0, 1)  # [batch, prompt]
    next_position = position_ids[:, -1:] + 1  # [batch, 1]

    new_tokens: list[list[int]] = [[] for _ in range(rows)]
    reasons: list[FinishReason] = ["length"] * rows
    done = [False] * rows  # host-side flags: no device sync per row
    # transformers 5.x renamed the KV-cache argument `past_key_values` to `cache`; accept both spellings.
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    past: Any = None
    step_ids, step_positions = input_ids, position_ids
    for _ in range(cfg.max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=step_positions,
            use_cache=True,
            **{cache_arg: past},
            **extra,  # only the last position's logits are needed
        )
        past = out[cache_arg] if cache_arg in out else out.past_key_values
        next_ids = sample_next(out.logits[:, -1], cfg.temperature, cfg.top_k, cfg.top_p, generator)  # [batch]
        finished = torch.tensor(done, device=device)  # [batch]
        next_ids = next_ids.masked_fill(finished, pad_id)  # finished rows are fed padding
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if token in eos_ids:
                done[row], reasons[row] = True, "stop"
                continue
            new_tokens[row].append(token)
            if cfg.stop:
                text = _decode(tokenizer, new_tokens[row])
                if _cut_at_stop(text, cfg.stop)[1]:
                    done[row], reasons[row] = True, "stop"
        if all(done):
            break
        # Next step feeds one token per row: the mask grows by one real column, positions by one.
        step_ids = next_ids[:, None]  # [batch, 1]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], dim=1)  # [batch, seq]
        step_positions, next_position = next_position, next_position + 1

    results = []
    for row in range(rows):
        text, _ = _cut_at_stop(_decode(tokenizer, new_tokens[row]), cfg.stop)
        results.append(
            Generation(
                text=text,
                token_ids=new_tokens[row],
                prompt_tokens=len(encoded[row]),
                completion_tokens=len(new_tokens[row]),
                finish_reason=reasons[row],
            )
        )
    log.debug("generated %d completions, %d tokens", rows, sum(len(t) for t in new_tokens))
    return results


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """Render chat messages as one prompt ending where the assistant's reply starts.

    Uses the tokenizer's own chat template when it has one; otherwise writes "role: content" lines and
    a final "assistant:" line.
    """
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert isinstance(rendered, str), f"chat template rendered {type(rendered).__name__}, expected str"
        return rendered
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])
