"""Masked-token evaluation of a masked LM (RoBERTa, BERT) on held-out texts (docs/method.md §6.3).

Each text is tokenized with its special tokens and truncated to a token limit. Of its non-special
positions, 15% (rounded, at least one) are chosen; each chosen position becomes the mask token with
probability 0.8, a random non-special id with probability 0.1, and stays unchanged otherwise. The model
sees the corrupted text once and predicts the original id at every chosen position: top-1, top-k
(k = `EvalConfig.topk`) and cross-entropy, as on causal LMs.

method.md draws the random ids from [4, vocab - 2], which for RoBERTa's vocabulary (specials 0..3,
<mask> last) is exactly its non-special ids; we draw from the tokenizer's non-special ids, which is
the same set there and stays right for BERT, whose specials sit elsewhere.

The masking is seeded and stated: a text's choices come from a generator seeded by the eval seed
(`EvalConfig.seed`) and the text's token ids, drawn before any batching, so one seed masks the same
positions in any batch size, any set order and every step of a run. (The eval seed, not the run's
`PruneConfig.seed`: random-baseline runs at other seeds are then scored on the same masked positions.)

Rows have the causal path's column layout (`evaluation.N_STATS`), one row per text, so
`result_from_sums` gives the same EvalResult with bootstrap intervals over texts. The "skip" columns
leave out targets among the `EvalConfig.skip_common` most frequent non-special tokens of the texts.
Which texts are scored follows `plan_eval`: in order, until more than `EvalConfig.sample_tokens`
skip predictions are covered.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune_core.batching import TokenBatch, encode_texts, pad_rows, pad_token_id
from selprune_core.config import EvalConfig
from selprune_core.errors import ConfigError, EmptyDatasetError
from selprune_core.evaluation import N_STATS, EvalResult, prediction_stats, result_from_sums
from selprune_core.lm_head import HEAD_CHUNK
from selprune_core.partial_forward import decoder_body
from selprune_core.placement import input_device

__all__ = [
    "MlmBatch",
    "MlmMasking",
    "MlmPlan",
    "MlmVocab",
    "common_mlm_targets",
    "evaluate_mlm",
    "mask_text",
    "mlm_rows",
    "mlm_vocab",
    "plan_mlm",
    "text_generator",
]


@dataclass(frozen=True)
class MlmMasking:
    """Which positions are predicted and how they are corrupted (BERT's recipe, docs/method.md §6.3)."""

    share: float = 0.15  # of each text's non-special positions chosen (rounded, at least 1)
    to_mask: float = 0.8  # chosen positions that become the mask token
    to_random: float = 0.1  # chosen positions that become a random non-special id; the rest stay

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1:
            raise ConfigError(f"masking share must be in (0, 1], got {self.share}")
        if self.to_mask < 0 or self.to_random < 0 or self.to_mask + self.to_random > 1:
            raise ConfigError(f"to_mask and to_random must be >= 0 and sum to <= 1: {self}")


@dataclass(frozen=True)
class MlmVocab:
    """What masking needs from a tokenizer."""

    mask_id: int
    special_ids: frozenset[int]  # never chosen, never drawn as random replacements
    candidates: torch.Tensor  # [n] int64, the non-special ids random replacements are drawn from


def mlm_vocab(tokenizer: PreTrainedTokenizerBase) -> MlmVocab:
    """The tokenizer's mask token and special ids; ConfigError when it has no mask token."""
    if tokenizer.mask_token_id is None:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has no mask token: not a masked-LM tokenizer"
        )
    special = frozenset(int(i) for i in tokenizer.all_special_ids)
    candidates = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)
    return MlmVocab(int(tokenizer.mask_token_id), special, candidates)


def text_generator(seed: int, ids: Sequence[int]) -> torch.Generator:
    """A generator seeded by the eval seed and the text's token ids (independent of batching and order)."""
    digest = hashlib.sha256(f"{seed}:{','.join(map(str, ids))}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def mask_text(
    ids: Sequence[int], vocab: MlmVocab, masking: MlmMasking, g: torch.Generator
) -> tuple[list[int], list[int]]:
    """(corrupted ids, chosen positions in increasing order) of one text; ([], []) without a
    non-special token. The original ids at the chosen positions are the targets."""
    eligible = [pos for pos, token in enumerate(ids) if token not in vocab.special_ids]
    if not eligible:
        return [], []
    n = max(1, round(masking.share * len(eligible)))
    order = torch.randperm(len(eligible), generator=g)[:n]
    chosen = sorted(eligible[i] for i in order.tolist())
    action = torch.rand(len(chosen), generator=g).tolist()  # [chosen] one draw each, in position order
    random_ids = vocab.candidates[torch.randint(len(vocab.candidates), (len(chosen),), generator=g)].tolist()
    corrupted = list(ids)
    for pos, u, replacement in zip(chosen, action, random_ids, strict=True):
        if u < masking.to_mask:
            corrupted[pos] = vocab.mask_id
        elif u < masking.to_mask + masking.to_random:
            corrupted[pos] = int(replacement)
    return corrupted, chosen


def common_mlm_targets(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, n: int, token_limit: int
) -> tuple[int, ...]:
    """The `n` most frequent non-special ids of the truncated texts, most frequent first (ties: smaller id)."""
    if n <= 0:
        return ()
    special = set(tokenizer.all_special_ids)
    counts: Counter[int] = Counter()
    for _, ids in encode_texts(tokenizer, texts, token_limit=token_limit):
        counts.update(token for token in ids if token not in special)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return tuple(int(token) for token, _ in ranked[:n])


@dataclass(frozen=True)
class MlmBatch:
    """Corrupted texts, padded, and where their predictions are."""

    tokens: TokenBatch  # corrupted ids [batch, pos], right-padded; text_index = position in the set
    rows: torch.Tensor  # [pred] int64, the batch row of each prediction
    cols: torch.Tensor  # [pred] int64, its position in the row
    targets: torch.Tensor  # [pred] int64, the original ids there


@dataclass(frozen=True)
class MlmPlan:
    """The texts of one set an evaluation scores, masked once, in length-sorted batches (on the CPU)."""

    batches: tuple[MlmBatch, ...]
    n_texts: int
    seed: int  # the masking seed


def plan_mlm(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    cfg: EvalConfig,
    *,
    token_limit: int,
    masking: MlmMasking | None = None,
    common_ids: Sequence[int] = (),
) -> MlmPlan:
    """Mask texts in order, until more than `cfg.sample_tokens` predictions have a target outside
    `common_ids`, and batch them longest first (`cfg.batch_size` rows of the longest text's width per
    batch). Texts without a non-special token are skipped; EmptyDatasetError when none is left."""
    masking = masking if masking is not None else MlmMasking()
    vocab = mlm_vocab(tokenizer)
    common = set(common_ids)
    rows: list[tuple[int, list[int], list[int], list[int]]] = []  # (index, corrupted, positions, targets)
    n_skip = 0
    for index, ids in encode_texts(tokenizer, texts, token_limit=token_limit):
        corrupted, chosen = mask_text(ids, vocab, masking, text_generator(cfg.seed, ids))
        if not chosen:
            continue
        targets = [ids[pos] for pos in chosen]
        rows.append((index, corrupted, chosen, targets))
        n_skip += sum(1 for target in targets if target not in common)
        if n_skip > cfg.sample_tokens:
            break
    if not rows:
        raise EmptyDatasetError(f"no text to evaluate: none of {len(texts)} texts has a non-special token")
    by_length = sorted(rows, key=lambda row: (-len(row[1]), row[0]))
    cap = cfg.batch_size * len(by_length[0][1])
    pad_id = pad_token_id(tokenizer)
    batches = []
    start = 0
    while start < len(by_length):
        part = by_length[start : start + max(1, cap // len(by_length[start][1]))]
        tokens = pad_rows([(index, corrupted) for index, corrupted, _, _ in part], pad_id, device="cpu")
        row_of = [row for row, (_, _, chosen, _) in enumerate(part) for _ in chosen]
        batches.append(
            MlmBatch(
                tokens=tokens,
                rows=torch.tensor(row_of, dtype=torch.long),
                cols=torch.tensor([pos for _, _, chosen, _ in part for pos in chosen], dtype=torch.long),
                targets=torch.tensor([t for _, _, _, targets in part for t in targets], dtype=torch.long),
            )
        )
        start += len(part)
    return MlmPlan(batches=tuple(batches), n_texts=len(rows), seed=cfg.seed)


# One verdict per model: the MLM head as a module apart from the body, or None (full forwards).
_HEADS: weakref.WeakKeyDictionary[nn.Module, nn.Module | None] = weakref.WeakKeyDictionary()


def _mlm_head(model: nn.Module) -> nn.Module | None:
    """The child of `model` holding its output embedding (RoBERTa's `lm_head`, BERT's `cls`), checked
    once to reproduce the model's logits from the body's last hidden state."""
    if model in _HEADS:
        return _HEADS[model]
    body, head = decoder_body(model), None
    get_output = getattr(model, "get_output_embeddings", None)
    decoder = get_output() if callable(get_output) else None
    if body is not model and isinstance(decoder, nn.Module):
        for child in model.children():
            if child is not body and any(m is decoder for m in child.modules()):
                head = child
    if head is not None:
        assert decoder is not None
        vocab = int(decoder.weight.shape[0])
        ids = (torch.arange(4, 11, device=input_device(model)) % vocab)[None]  # [1, 7] arbitrary ids
        full = model(input_ids=ids).logits.float()  # [1, 7, vocab]
        parts = head(body(input_ids=ids).last_hidden_state).float()
        fp32 = next(model.parameters()).dtype == torch.float32
        tolerance = (1e-4 if fp32 else 2e-2) * full.abs().max().clamp_min(1e-6)
        if parts.shape != full.shape or (parts - full).abs().max() > tolerance:
            head = None
    _HEADS[model] = head
    return head


@torch.no_grad()
def mlm_rows(
    model: nn.Module, plan: MlmPlan, cfg: EvalConfig, *, common_ids: Sequence[int] = ()
) -> torch.Tensor:
    """One row of prediction sums per scored text [text, N_STATS] float64, in the texts' set order."""
    model.eval()
    device = input_device(model)
    common = torch.tensor(sorted(set(common_ids)), dtype=torch.long, device=device)  # [n_common]
    per_text = torch.zeros(plan.n_texts, N_STATS, dtype=torch.float64)
    order = sorted(index for batch in plan.batches for index in batch.tokens.text_index)
    slot = {index: i for i, index in enumerate(order)}
    head, body = _mlm_head(model), decoder_body(model)
    for batch in plan.batches:
        ids, mask = batch.tokens.input_ids.to(device), batch.tokens.attention_mask.to(device)  # [batch, pos]
        rows, cols, targets = batch.rows.to(device), batch.cols.to(device), batch.targets.to(device)
        sums = torch.zeros(ids.shape[0], N_STATS, dtype=torch.float64, device=device)  # [batch, N_STATS]
        if head is None:  # full forward: logits [batch, pos, vocab], read at the predicted positions
            stats = prediction_stats(
                model(input_ids=ids, attention_mask=mask).logits[rows, cols], targets, common, cfg.topk
            )
            sums.index_add_(0, rows, stats.to(device))
        else:  # the head only where a prediction is scored, HEAD_CHUNK positions at a time
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state[rows, cols]  # [pred, hidden]
            for start in range(0, len(targets), HEAD_CHUNK):
                chunk = slice(start, start + HEAD_CHUNK)
                stats = prediction_stats(
                    head(hidden[chunk]), targets[chunk], common, cfg.topk
                )  # [chunk, N_STATS]
                sums.index_add_(0, rows[chunk], stats.to(device))
        per_text[[slot[index] for index in batch.tokens.text_index]] = sums.cpu()
    return per_text


def evaluate_mlm(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    cfg: EvalConfig,
    *,
    token_limit: int | None = None,
    masking: MlmMasking | None = None,
    common_ids: Sequence[int] = (),
) -> EvalResult:
    """Masked-token top-1 / top-k / loss on `texts`, 95% bootstrap intervals over texts.

    `token_limit` defaults to `cfg.token_limit`; it must not exceed what the model's positions hold.
    """
    limit = cfg.token_limit if token_limit is None else token_limit
    plan = plan_mlm(tokenizer, texts, cfg, token_limit=limit, masking=masking, common_ids=common_ids)
    return result_from_sums(mlm_rows(model, plan, cfg, common_ids=common_ids), cfg)
