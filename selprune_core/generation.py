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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune_core.config import SamplingConfig

__all__ = [
    "Generation",
    "GenerationRow",
    "apply_chat_template",
    "encode_prompts",
    "generate",
    "generate_rows",
    "sample_next",
]

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
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Pick one token per row from last-position logits [batch, vocab]; returns ids [batch].

    Each setting is a scalar or a [batch] tensor. Rows with temperature 0 are greedy. The others are
    sampled from softmax(logits / temperature), restricted first to the `top_k` largest logits (0 = off,
    ties at the k-th value kept) and then to the smallest set of most likely tokens holding `top_p`
    of the mass (1 = off), the same filters and order as Hugging Face's warpers. `generator` is one
    generator for the batch or one per row (None entries use torch's global generator).
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
    if generator is None or isinstance(generator, torch.Generator):
        choice = torch.multinomial(probs, 1, generator=generator)  # [batch, 1] index in sorted order
    else:
        # One draw per row from the row's own generator: a row's samples ignore its batch companions.
        assert len(generator) == rows, f"{len(generator)} generators for {rows} rows"
        choice = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generator)])
        choice = choice[:, None]  # [batch, 1]
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


@dataclass(frozen=True)
class GenerationRow:
    """One row of a batch: its prompt tokens and its own decoding settings (rows of one batch may
    differ in every setting, which is how requests from different callers share a batch)."""

    prompt_ids: list[int]  # at least one token
    sampling: SamplingConfig


# Called once per decoding step with the (row, text) pieces that step produced, for streaming.
OnText = Callable[[list[tuple[int, str]]], None]


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *, add_special_tokens: bool = True
) -> list[list[int]]:
    """Token ids of each prompt; an empty prompt becomes [BOS] (or EOS, as GPT-2 has no BOS)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    return [list(ids) if len(ids) > 0 else [int(start_id or 0)] for ids in encoded]


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

    With `cfg.seed` set, prompt i samples from its own generator seeded with seed + i, so a prompt's
    text depends on the seed and its position, never on the batch size or its batch companions. Pass
    `add_special_tokens=False` for prompts that already carry BOS (chat templates usually do).
    """
    assert batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"
    encoded = encode_prompts(tokenizer, prompts, add_special_tokens=add_special_tokens)
    rows = [
        GenerationRow(ids, cfg if cfg.seed is None else replace(cfg, seed=cfg.seed + i))
        for i, ids in enumerate(encoded)
    ]
    results: list[Generation] = []
    for start in range(0, len(rows), batch_size):
        results.extend(generate_rows(model, tokenizer, rows[start : start + batch_size]))
    return results


class _TextStream:
    """Turns one row's growing token list into safe-to-show text pieces.

    Holds back a trailing partial character (U+FFFD from an incomplete byte sequence) and, while the row
    runs, the last len(longest stop) - 1 characters, which could still become the start of a stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.shown = 0

    def piece(self, text: str, final: bool) -> str:
        safe = text if final else text[: max(len(text) - self.hold, 0)]
        if not final:
            safe = safe.rstrip("\ufffd")
        out, self.shown = safe[self.shown :], max(self.shown, len(safe))
        return out


@torch.no_grad()
def generate_rows(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[GenerationRow],
    *,
    on_text: OnText | None = None,
) -> list[Generation]:
    """Run `rows` as one batch, each with its own settings; returns their generations in order.

    A row with a seed samples from its own generator, so its text does not depend on what else is in
    the batch; a row without one uses torch's global generator. Each row stops at its own EOS, stop
    string or max_new_tokens; finished rows are fed padding until the last row ends. `on_text`, when
    given, receives each step's new text per row, for streaming.
    """
    assert rows, "generate_rows needs at least one row"
    model.eval()
    device = next(model.parameters()).device
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = int(pad_id) if pad_id is not None else 0
    n = len(rows)
    generators = [
        None if r.sampling.seed is None else torch.Generator(device=device).manual_seed(r.sampling.seed)
        for r in rows
    ]
    temperature = torch.tensor([r.sampling.temperature for r in rows], device=device)  # [batch]
    top_k = torch.tensor([r.sampling.top_k for r in rows], device=device)  # [batch]
    top_p = torch.tensor([r.sampling.top_p for r in rows], device=device)  # [batch]
    limits = [r.sampling.max_new_tokens for r in rows]

    # Left-pad by hand, leaving the tokenizer's padding_side alone (it is shared with other callers).
    width = max(len(r.prompt_ids) for r in rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)  # [batch, prompt]
    attention_mask = torch.zeros((n, width), dtype=torch.long)  # [batch, prompt]
    for row, r in enumerate(rows):
        assert r.prompt_ids, f"row {row} has no prompt tokens"
        input_ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
        attention_mask[row, width - len(r.prompt_ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # Positions count real tokens only, so a padded row sees the same positions as it would alone.
    position_ids = (attention_mask.cumsum(dim=-1) - 1).masked_fill(attention_mask == 0, 1)  # [batch, prompt]
    next_position = position_ids[:, -1:] + 1  # [batch, 1]

    new_tokens: list[list[int]] = [[] for _ in range(n)]
    reasons: list[FinishReason] = ["length"] * n
    done = [False] * n  # host-side flags: no device sync per row
    streams = [_TextStream(r.sampling.stop) for r in rows]
    # transformers 5.x renamed the KV-cache argument `past_key_values` to `cache`; accept both spellings.
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    past: Any = None
    step_ids, step_positions = input_ids, position_ids
    for _ in range(max(limits)):
        out = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=step_positions,
            use_cache=True,
            **{cache_arg: past},
            **extra,  # only the last position's logits are needed
        )
        past = out[cache_arg] if cache_arg in out else out.past_key_values
        next_ids = sample_next(out.logits[:, -1], temperature, top_k, top_p, generators)  # [batch]
        next_ids = next_ids.masked_fill(torch.tensor(done, device=device), pad_id)  # finished rows: padding
        pieces: list[tuple[int, str]] = []
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if token in eos_ids and not rows[row].sampling.ignore_eos:
                done[row], reasons[row] = True, "stop"
            else:
                new_tokens[row].append(token)
                done[row] = len(new_tokens[row]) >= limits[row]
            stops = rows[row].sampling.stop
            if not (stops or on_text):
                continue
            text, stopped = _cut_at_stop(_decode(tokenizer, new_tokens[row]), stops)
            if stopped:
                done[row], reasons[row] = True, "stop"
            if on_text is not None and (piece := streams[row].piece(text, final=done[row])):
                pieces.append((row, piece))
        if on_text is not None and pieces:
            on_text(pieces)
        if all(done):
            break
        # Next step feeds one token per row: the mask grows by one real column, positions by one.
        step_ids = next_ids[:, None]  # [batch, 1]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(n, 1)], dim=1)  # [batch, seq]
        step_positions, next_position = next_position, next_position + 1

    results = []
    for row, r in enumerate(rows):
        text, _ = _cut_at_stop(_decode(tokenizer, new_tokens[row]), r.sampling.stop)
        results.append(
            Generation(
                text=text,
                token_ids=new_tokens[row],
                prompt_tokens=len(r.prompt_ids),
                completion_tokens=len(new_tokens[row]),
                finish_reason=reasons[row],
            )
        )
    log.debug("generated %d completions, %d tokens", n, sum(len(t) for t in new_tokens))
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
