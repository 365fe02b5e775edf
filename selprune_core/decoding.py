"""Batched decoding with our own loop: `DecodeBatch`, a batch of rows that grows and shrinks.

We do not call `model.generate`: the serving path applies per-row masks through forward pre-hooks and
per-row sampling settings, and admits new requests into a running batch (continuous batching), so the
loop keeps its own state: a KV cache, an attention mask, and per row its tokens, settings and generator.

Rows are left-padded, so every row's next token sits in the last column. Position ids count only real
tokens, as `model.generate` computes them, so a padded row sees the positions it would see alone.
A batch is `prefill`ed (one forward over the prompts), then `step`ped one token at a time; rows that
finish are popped and the batch shrinks; `extend` merges a freshly prefilled batch into a running one by
left-padding the shorter cache. Merging needs plain `DynamicLayer` caches (`mergeable`): sliding-window
and other cache types still decode, just without admitting rows mid-flight.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune_core.config import SamplingConfig
from selprune_core.placement import input_device
from selprune_core.sampling import sample_next
from selprune_core.token_logprobs import TokenLogprob, chosen_logprobs, prompt_logprobs

__all__ = ["DecodeBatch", "Generation", "GenerationRow", "cache_takes_rows"]

FinishReason = Literal["stop", "length"]
Piece = tuple[Hashable, str]  # (row key, new text)


@dataclass(frozen=True)
class Generation:
    """One completion. `token_ids` are the generated tokens, without the prompt and without EOS."""

    text: str  # decoded completion, cut before the first stop string
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason  # "stop": EOS or a stop string; "length": max_new_tokens reached
    # With sampling.logprobs: the prompt's tokens (with echo), then each generated token's (an ending EOS
    # included).
    logprobs: list[TokenLogprob] | None = None


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


@dataclass
class _Row:
    key: Hashable
    prompt_len: int
    sampling: SamplingConfig
    generator: torch.Generator | None
    stream: _TextStream | None  # None: nobody reads this row's text until it finishes
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # when sampling.logprobs is set
    done: bool = False
    reason: FinishReason = "length"


class DecodeBatch:
    """Rows decoding together on one model. Not thread-safe: one lane drives it."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        rows: Sequence[GenerationRow],
        keys: Sequence[Hashable] | None = None,
        *,
        stream: bool | Sequence[bool] = False,
    ) -> None:
        """`keys` name the rows in what the batch returns (default 0..n-1); rows with `stream` set get
        their new text back from prefill/step as it is produced."""
        assert rows, "a batch needs at least one row"
        keys = list(range(len(rows))) if keys is None else list(keys)
        assert len(keys) == len(rows), f"{len(keys)} keys for {len(rows)} rows"
        streams = [stream] * len(rows) if isinstance(stream, bool) else list(stream)
        self.model, self.tokenizer = model, tokenizer
        self.device = input_device(model)  # where token ids go (a device_map may split the model)
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.rows = [
            _Row(
                key=key,
                prompt_len=len(r.prompt_ids),
                sampling=r.sampling,
                generator=None
                if r.sampling.seed is None
                else torch.Generator(device=self.device).manual_seed(r.sampling.seed),
                stream=_TextStream(r.sampling.stop) if wanted else None,
                logprobs=None if r.sampling.logprobs is None else [],
            )
            for key, r, wanted in zip(keys, rows, streams, strict=True)
        ]
        self._prompts = [list(r.prompt_ids) for r in rows]
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed the KV-cache argument `past_key_values` to `cache`; accept both.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache: Any = None
        self.attention_mask = torch.empty(0)  # [batch, cached positions], 1 on real tokens
        self.next_ids = torch.empty(0)  # [batch] sampled, not yet fed
        self.next_positions = torch.empty(0)  # [batch, 1] position of next_ids

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def keys(self) -> list[Hashable]:
        return [r.key for r in self.rows]

    @property
    def mergeable(self) -> bool:
        """Whether `extend` can merge into this batch (see `cache_takes_rows`)."""
        return cache_takes_rows(self.cache)

    # Decoding ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self) -> list[Piece]:
        """One forward over the left-padded prompts; samples every row's first token."""
        assert self.cache is None, "prefill runs once"
        rows, width = len(self.rows), max(len(p) for p in self._prompts)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)  # [batch, prompt]
        mask = torch.zeros((rows, width), dtype=torch.long)  # [batch, prompt]
        for i, ids in enumerate(self._prompts):
            assert ids, f"row {i} has no prompt tokens"
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=-1) - 1).masked_fill(mask == 0, 1)  # [batch, prompt]
        self.model.eval()  # once per batch: steps are many and a mode switch walks every module
        prompts, self._prompts = self._prompts, []
        self.attention_mask = mask
        echo = [r.logprobs is not None and r.sampling.echo for r in self.rows]
        return self._forward(
            input_ids,
            positions,
            next_positions=positions[:, -1:] + 1,
            echo=(prompts, echo) if any(echo) else None,
        )

    @torch.no_grad()
    def step(self) -> list[Piece]:
        """Feed every row its last sampled token and sample the next one."""
        assert self.cache is not None, "prefill first"
        assert not any(r.done for r in self.rows), "pop_finished before stepping"
        ones = self.attention_mask.new_ones(len(self.rows), 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)  # [batch, cached + 1]
        return self._forward(self.next_ids[:, None], self.next_positions, self.next_positions + 1)

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        next_positions: torch.Tensor,
        echo: tuple[list[list[int]], list[bool]] | None = None,  # prefill: prompts, rows wanting theirs
    ) -> list[Piece]:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: self.cache},
            # only the last position's logits are needed, unless a prompt's log-probabilities are
            **({} if echo is not None else self._extra),
        )
        if echo is not None:  # logits [batch, width, vocab]; a left-padded prompt ends at the last column
            for index, (row, prompt, wanted) in enumerate(zip(self.rows, *echo, strict=True)):
                if wanted and row.logprobs is not None:
                    logits = out.logits[index, -len(prompt) :]  # [prompt, vocab]
                    row.logprobs.extend(prompt_logprobs(logits, prompt, row.sampling.logprobs or 0))
        self.cache = out[self._cache_arg] if self._cache_arg in out else out.past_key_values
        settings = [r.sampling for r in self.rows]
        if all(s.temperature == 0 for s in settings):  # all greedy: no per-row tensors, no device sync
            self.next_ids = out.logits[:, -1].argmax(dim=-1)  # [batch]
        else:
            temperature = torch.tensor([s.temperature for s in settings], device=self.device)  # [batch]
            top_k = torch.tensor([s.top_k for s in settings], device=self.device)  # [batch]
            top_p = torch.tensor([s.top_p for s in settings], device=self.device)  # [batch]
            generators = [r.generator for r in self.rows]
            self.next_ids = sample_next(out.logits[:, -1], temperature, top_k, top_p, generators)  # [batch]
        self.next_positions = next_positions
        ks = [None if r.logprobs is None else r.sampling.logprobs for r in self.rows]
        return self._advance(self.next_ids.tolist(), chosen_logprobs(out.logits[:, -1], self.next_ids, ks))

    def _advance(self, tokens: list[int], logprobs: list[TokenLogprob | None]) -> list[Piece]:
        pieces: list[Piece] = []
        for row, token, logprob in zip(self.rows, tokens, logprobs, strict=True):
            # An ending EOS is reported with the log-probabilities (as vLLM does), never in the text.
            if row.logprobs is not None and logprob is not None:
                row.logprobs.append(logprob)
            if token in self.eos_ids and not row.sampling.ignore_eos:
                row.done, row.reason = True, "stop"
            else:
                row.tokens.append(token)
                row.done = len(row.tokens) >= row.sampling.max_new_tokens
            if not row.sampling.stop and row.stream is None:
                continue
            text, stopped = _cut_at_stop(_decode(self.tokenizer, row.tokens), row.sampling.stop)
            if stopped:
                row.done, row.reason = True, "stop"
            if row.stream is not None and (piece := row.stream.piece(text, final=row.done)):
                pieces.append((row.key, piece))
        return pieces

    # Shape changes ----------------------------------------------------------------------------------
    def pop_finished(self) -> list[tuple[Hashable, Generation]]:
        """Remove the rows that have finished and return their generations (the batch shrinks)."""
        finished = [(r.key, self._generation(r)) for r in self.rows if r.done]
        if finished:
            self._keep([i for i, r in enumerate(self.rows) if not r.done])
        return finished

    def drop(self, keys: Collection[Hashable]) -> None:
        """Remove the rows named by `keys` unfinished (nobody waits for them any more)."""
        if any(r.key in keys for r in self.rows):
            self._keep([i for i, r in enumerate(self.rows) if r.key not in keys])

    def _keep(self, keep: list[int]) -> None:
        """Keep only the rows at these indices, in order, with their cache rows."""
        self.rows = [self.rows[i] for i in keep]
        if keep and self.cache is not None:
            rows = torch.tensor(keep, dtype=torch.long)
            index = rows.to(self.device)
            # A CPU index: cache layers a device_map put on other devices accept it, a device index not.
            self.cache.batch_select_indices(rows)
            self.attention_mask = self.attention_mask.index_select(0, index)
            self.next_ids = self.next_ids.index_select(0, index)
            self.next_positions = self.next_positions.index_select(0, index)
            self._trim_left()

    def extend(self, other: DecodeBatch) -> None:
        """Merge a prefilled batch into this one: the shorter cache is left-padded with masked zeros.
        All or nothing: every merged tensor is built before any is stored, so a failure (out of memory)
        leaves this batch as it was."""
        assert self.mergeable and other.mergeable, "extend needs DynamicLayer caches on both sides"
        assert other.model is self.model, "rows of one batch share one model"
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        layers = [
            (
                torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)]),
                torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)]),
            )
            for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True)
        ]
        masks = [_pad_left(m, width, 1) for m in (self.attention_mask, other.attention_mask)]
        attention_mask = torch.cat(masks)  # [batch, width]
        next_ids = torch.cat([self.next_ids, other.next_ids])
        next_positions = torch.cat([self.next_positions, other.next_positions])
        for layer, (keys, values) in zip(self.cache.layers, layers, strict=True):
            layer.keys, layer.values = keys, values
        self.attention_mask, self.next_ids, self.next_positions = attention_mask, next_ids, next_positions
        self.rows.extend(other.rows)

    def _trim_left(self) -> None:
        """Drop leading cache columns that no remaining row attends to (padding of departed rows)."""
        if not self.mergeable:
            return
        first = int((self.attention_mask != 0).int().argmax(dim=1).min())
        if first > 0:
            self.attention_mask = self.attention_mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]

    def _generation(self, row: _Row) -> Generation:
        text, _ = _cut_at_stop(_decode(self.tokenizer, row.tokens), row.sampling.stop)
        return Generation(
            text=text,
            token_ids=row.tokens,
            prompt_tokens=row.prompt_len,
            completion_tokens=len(row.tokens),
            finish_reason=row.reason,
            logprobs=row.logprobs,
        )


def cache_takes_rows(cache: Any) -> bool:
    """Whether rows can be merged into a batch holding this KV cache: every layer a plain growing
    tensor pair (sliding-window and static layers cannot be left-padded)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros before `x` along `dim` up to `width` (keys/values: masked out; masks: not attended)."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
