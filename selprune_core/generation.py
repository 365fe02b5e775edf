"""Text generation for callers that want whole completions: prompts in, `Generation`s out.

The decoding itself (a batch of rows with its own settings per row, a KV cache, left padding, rows
leaving as they finish) is `selprune_core.decoding.DecodeBatch`; `generate_rows` runs one batch to the
end and `generate` splits prompts into batches. The serving lane drives DecodeBatch directly to admit
requests into a running batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune_core.config import SamplingConfig
from selprune_core.decoding import DecodeBatch, Generation, GenerationRow
from selprune_core.sampling import sample_next

__all__ = [
    "Generation",
    "GenerationRow",
    "apply_chat_template",
    "encode_prompts",
    "generate",
    "generate_rows",
    "sample_next",
]

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
    string or max_new_tokens and leaves the batch. `on_text`, when given, receives each step's new
    text per row, for streaming.
    """
    batch = DecodeBatch(model, tokenizer, rows, stream=on_text is not None)
    results: dict[Hashable, Generation] = {}
    pieces = batch.prefill()
    while True:
        if on_text is not None and pieces:
            on_text([(cast(int, key), text) for key, text in pieces])
        results.update(batch.pop_finished())
        if not len(batch):
            break
        pieces = batch.step()
    return [results[i] for i in range(len(rows))]


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
