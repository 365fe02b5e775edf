"""Next-token evaluation of a causal LM on held-out texts, with bootstrap confidence intervals.

Each text is truncated to `token_limit` tokens and run once; the logits at positions 0..T-2 are scored
against the targets at 1..T-1 (docs/method.md §6.1), so the prediction from BOS counts. Padding never counts:
rows are right-padded and each row is sliced to its own length before scoring.

Which texts are scored is decided from the tokens alone (`plan_eval`): texts in order until more than
`sample_tokens` skip predictions are covered. The plan is tokenized once and batched by length
(longest first, each batch filled up to `batch_size` rows of the longest text's width), so padding
costs almost nothing and a run that evaluates the same sets every step tokenizes them once.

The "skip" metrics drop targets that are among the most common target tokens. The authors used one
fixed list of Llama token strings for every model (docs/method.md §9.6); here the list is recomputed per
tokenizer from the evaluation texts by `common_target_ids`.

All metrics are ratios of sums over texts, so we keep one row of sums per text and bootstrap over texts
for 95% confidence intervals. Accuracies are fractions in [0, 1] everywhere, the step reports included
(the authors' trajectory record, docs/method.md §5.5, held percentages); only displays show percent.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune_core.batching import TokenBatch, encode_texts, pad_rows, pad_token_id
from selprune_core.config import EvalConfig
from selprune_core.errors import EmptyDatasetError
from selprune_core.lm_head import HEAD_CHUNK, SplitHead, split_head
from selprune_core.placement import input_device

__all__ = [
    "EvalPlan",
    "EvalResult",
    "plan_eval",
    "evaluate_plan",
    "result_from_sums",
    "prediction_stats",
    "text_sums",
    "plan_sets",
    "common_target_ids",
    "evaluate_texts",
    "evaluate_sets",
    "relative_drop",
    "bootstrap_ci",
]

log = logging.getLogger(__name__)

# Columns of the per-text sums table, [text, N_STATS] float64.
N_PRED, TOP1, TOPK, N_SKIP, SKIP_TOP1, SKIP_TOPK, CE_SUM, EXP_CE_SUM = range(8)
N_STATS = 8

# A metric maps summed columns [..., N_STATS] to one value per leading index [...].
Metric = Callable[[torch.Tensor], torch.Tensor]


def _ratio(num: int, den: int) -> Metric:
    # 0/0 (e.g. no skip targets at all) gives NaN, which the bootstrap skips and as_dict writes as None
    return lambda sums: sums[..., num] / sums[..., den]


# The metrics, each a ratio of sums over texts so that every bootstrap resample is scored the same way.
METRICS: dict[str, Metric] = {
    "top1": _ratio(TOP1, N_PRED),
    "topk": _ratio(TOPK, N_PRED),
    "skip_top1": _ratio(SKIP_TOP1, N_SKIP),
    "skip_topk": _ratio(SKIP_TOPK, N_SKIP),
    "loss": _ratio(CE_SUM, N_PRED),  # mean per-token cross-entropy (nats)
    "perplexity": lambda sums: torch.exp(sums[..., CE_SUM] / sums[..., N_PRED]),  # standard exp(mean CE)
    "legacy_perplexity": _ratio(EXP_CE_SUM, N_PRED),  # authors' mean of exp(CE), docs/method.md §9.17
}
CI_METRICS = ("top1", "topk", "skip_top1", "skip_topk", "loss", "perplexity")


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation set; accuracies are fractions, loss is in nats per token."""

    top1: float
    topk: float
    skip_top1: float  # NaN when every target was a common token
    skip_topk: float
    loss: float
    perplexity: float  # exp(loss)
    legacy_perplexity: float  # mean of exp(per-token CE), for parity with the authors' numbers
    n_tokens: int  # predictions scored
    n_skip_tokens: int  # predictions whose target is not a common token
    n_texts: int
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95% bootstrap interval per metric

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form: NaN and infinities become None, intervals become two-item lists."""
        out: dict[str, Any] = {name: _json_float(getattr(self, name)) for name in METRICS}
        out.update(n_tokens=self.n_tokens, n_skip_tokens=self.n_skip_tokens, n_texts=self.n_texts)
        out["ci"] = {name: [_json_float(lo), _json_float(hi)] for name, (lo, hi) in self.ci.items()}
        return out


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def relative_drop(before: float, after: float) -> float:
    """(before - after) / before, the relative drop of the paper's curves; 0 when before is 0."""
    if before == 0:
        return 0.0
    return (before - after) / before


def common_target_ids(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, n: int, token_limit: int
) -> tuple[int, ...]:
    """The `n` most frequent target ids (positions 1..T-1 of each truncated text), most frequent first.

    Ties are broken by the smaller id so the list is deterministic. Texts are tokenized exactly as
    `evaluate_texts` does (special tokens added, truncated to `token_limit`), so BOS is never a target.
    """
    if n <= 0:
        return ()
    counts: Counter[int] = Counter()
    for _, ids in encode_texts(tokenizer, texts, token_limit=token_limit):
        counts.update(ids[1:])  # targets only: position 0 is never predicted
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return tuple(int(token) for token, _ in ranked[:n])


@dataclass(frozen=True)
class EvalPlan:
    """The texts of one set that an evaluation scores, tokenized, in length-sorted padded batches."""

    batches: tuple[TokenBatch, ...]  # on the CPU; rows longest first; text_index = position in the set
    n_texts: int  # texts scored (each has at least one prediction)


def plan_eval(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    cfg: EvalConfig,
    *,
    common_ids: Sequence[int] = (),
) -> EvalPlan:
    """Choose and batch the texts `evaluate_plan` scores: in order, until more than `cfg.sample_tokens`
    skip predictions (targets outside `common_ids`) are covered. Texts under two tokens are skipped.

    Raises EmptyDatasetError when no text has a prediction.
    """
    common = set(common_ids)
    rows: list[tuple[int, list[int]]] = []
    n_skip = 0
    for index, ids in encode_texts(tokenizer, texts, token_limit=cfg.token_limit):
        if len(ids) < 2:
            continue
        rows.append((index, ids))
        n_skip += sum(1 for target in ids[1:] if target not in common)
        if n_skip > cfg.sample_tokens:
            log.debug("eval: %d texts cover %d skip predictions", len(rows), n_skip)
            break
    if not rows:
        raise EmptyDatasetError(
            f"no text to evaluate: all {len(texts)} texts have fewer than 2 tokens, so there is no prediction"
        )
    by_length = sorted(rows, key=lambda row: (-len(row[1]), row[0]))
    cap = cfg.batch_size * len(by_length[0][1])  # tokens per batch: batch_size rows of the longest text
    pad_id = pad_token_id(tokenizer)
    batches: list[TokenBatch] = []
    start = 0
    while start < len(by_length):
        width = len(by_length[start][1])  # the longest row of this batch: rows are sorted
        stop = start + max(1, cap // width)
        batches.append(pad_rows(by_length[start:stop], pad_id, device="cpu"))
        start = stop
    return EvalPlan(batches=tuple(batches), n_texts=len(rows))


@torch.no_grad()
def evaluate_plan(
    model: nn.Module, plan: EvalPlan, cfg: EvalConfig, *, common_ids: Sequence[int] = ()
) -> EvalResult:
    """Top-1/top-k accuracy, skip variants, loss and perplexity of `model` on the texts of `plan`."""
    per_text = text_sums(model, plan, cfg, common_ids=common_ids)  # [text, N_STATS]
    return result_from_sums(per_text, cfg)


def result_from_sums(per_unit: torch.Tensor, cfg: EvalConfig) -> EvalResult:
    """Every metric of the summed rows [unit, N_STATS] (a unit is a text, or an image), with 95%
    intervals from resampling units."""
    totals = per_unit.sum(dim=0)  # [N_STATS]
    point = {name: float(metric(totals).item()) for name, metric in METRICS.items()}
    ci = bootstrap_ci(
        per_unit, {name: METRICS[name] for name in CI_METRICS}, n_samples=cfg.bootstrap_samples, seed=cfg.seed
    )
    return EvalResult(
        **point,
        n_tokens=int(totals[N_PRED].item()),
        n_skip_tokens=int(totals[N_SKIP].item()),
        n_texts=int(per_unit.shape[0]),
        ci=ci,
    )


@torch.no_grad()
def text_sums(
    model: nn.Module, plan: EvalPlan, cfg: EvalConfig, *, common_ids: Sequence[int] = ()
) -> torch.Tensor:
    """One row of sums per scored text [text, N_STATS] (float64, in the texts' order in their set):
    what every metric and interval is computed from, and per-text losses (CE_SUM / N_PRED)."""
    model.eval()
    device = input_device(model)  # where token ids go (a device_map may offload the first weights)
    common = torch.tensor(sorted(set(common_ids)), dtype=torch.long, device=device)  # [n_common]
    per_text = torch.zeros(plan.n_texts, N_STATS, dtype=torch.float64)  # [text, N_STATS], in text order
    texts = sorted(index for batch in plan.batches for index in batch.text_index)
    slot = {index: i for i, index in enumerate(texts)}
    split = split_head(model)
    for batch in plan.batches:
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)  # [batch, pos]
        lengths = batch.attention_mask.sum(dim=1).tolist()
        # no cache: one pass per batch, nothing kept beyond this loop iteration
        if split is None:  # logits [batch, pos, vocab] in the model dtype; rows sliced to their own length
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            stats = torch.stack(
                [
                    prediction_stats(logits[row, : n - 1], ids[row, 1:n], common, cfg.topk).sum(dim=0)
                    for row, n in enumerate(lengths)
                ]
            )  # [batch, N_STATS]
            del logits
        else:
            stats = _split_head_stats(split, ids, mask, common, cfg.topk)  # [batch, N_STATS]
        per_text[[slot[index] for index in batch.text_index]] = stats.cpu()
    return per_text


def evaluate_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    cfg: EvalConfig,
    *,
    common_ids: Sequence[int] = (),
) -> EvalResult:
    """`evaluate_plan` on `plan_eval(texts)`: texts in order until more than `cfg.sample_tokens` skip
    predictions are covered (texts under two tokens have no prediction and are skipped)."""
    plan = plan_eval(tokenizer, texts, cfg, common_ids=common_ids)
    return evaluate_plan(model, plan, cfg, common_ids=common_ids)


def _split_head_stats(
    split: SplitHead, ids: torch.Tensor, mask: torch.Tensor, common: torch.Tensor, k: int
) -> torch.Tensor:
    """Sums per row [batch, N_STATS] from the body's hidden states, the head applied only at the
    positions that predict (position t of a right-padded row predicts iff t+1 is a token), all rows'
    predictions together, HEAD_CHUNK at a time."""
    hidden = split.hidden(ids, mask)  # [batch, pos, hidden]
    valid = mask[:, 1:].bool().to(hidden.device)  # [batch, pos-1]
    positions = hidden[:, :-1][valid]  # [pred, hidden]
    targets = ids[:, 1:].to(hidden.device)[valid]  # [pred]
    row_of = torch.arange(ids.shape[0], device=hidden.device)[:, None].expand_as(valid)[valid]  # [pred]
    sums = torch.zeros(ids.shape[0], N_STATS, dtype=torch.float64, device=hidden.device)  # [batch, N_STATS]
    for start in range(0, targets.numel(), HEAD_CHUNK):
        logits = split.logits(positions[start : start + HEAD_CHUNK])  # [chunk, vocab], on the head's device
        chunk = slice(start, start + HEAD_CHUNK)
        per_prediction = prediction_stats(
            logits, targets[chunk].to(logits.device), common.to(logits.device), k
        )
        sums.index_add_(0, row_of[chunk], per_prediction.to(sums.device))
    return sums


def prediction_stats(
    logits: torch.Tensor, targets: torch.Tensor, common: torch.Tensor, k: int
) -> torch.Tensor:
    """One row of stats per prediction [pred, N_STATS], from logits [pred, vocab] and targets [pred]."""
    logits = logits.float()  # fp16/bf16 logits are scored in fp32
    ce = F.cross_entropy(logits, targets, reduction="none").double()  # [pred]
    # hit[p, j]: the j-th highest logit at position p is the target; j = 0 is the top-1 prediction
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # [pred, k]
    hit = top == targets[:, None]  # [pred, k]
    top1 = hit[:, 0]  # [pred]
    topk = hit.any(dim=-1)  # [pred]
    skip = ~torch.isin(targets, common)  # [pred] True where the target is not a common token
    return torch.stack(
        [
            torch.ones_like(ce),
            top1.double(),
            topk.double(),
            skip.double(),
            (top1 & skip).double(),
            (topk & skip).double(),
            ce,
            ce.exp(),  # the authors' "perplexity" averages exp(CE) per token
        ],
        dim=1,
    )  # [pred, N_STATS]


def bootstrap_ci(
    unit_sums: torch.Tensor, metrics: Mapping[str, Metric], *, n_samples: int, seed: int
) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of ratio-of-sums metrics, resampling units (texts, prompts) with replacement.

    `unit_sums` is [unit, stat]; each resample draws `unit` indices and sums their rows, and every metric
    maps those totals [resample, stat] to values [resample]. Resamples where a metric is NaN (0/0) are
    ignored. Returns {} when `n_samples` is 0.
    """
    if n_samples <= 0:
        return {}
    sums = unit_sums.double().cpu()  # [unit, stat]
    n_units = sums.shape[0]
    gen = torch.Generator().manual_seed(seed)
    # Resample through count weights, chunked so [chunk, unit] stays around 2M entries for any size.
    chunk = max(1, 2_000_000 // n_units)
    totals: list[torch.Tensor] = []
    for start in range(0, n_samples, chunk):
        size = min(chunk, n_samples - start)
        idx = torch.randint(n_units, (size, n_units), generator=gen)  # [chunk, unit] drawn unit ids
        weights = torch.zeros(size, n_units, dtype=torch.float64)
        weights.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))  # [chunk, unit] draw counts
        totals.append(weights @ sums)  # [chunk, stat]
    resampled = torch.cat(totals)  # [resample, stat]
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    ci: dict[str, tuple[float, float]] = {}
    for name, metric in metrics.items():
        values = metric(resampled)  # [resample]
        lo, hi = torch.nanquantile(values, q).tolist()
        ci[name] = (float(lo), float(hi))
    return ci


def plan_sets(
    tokenizer: PreTrainedTokenizerBase,
    eval_sets: Mapping[str, Sequence[str]],
    cfg: EvalConfig,
    *,
    common_ids: Sequence[int],
) -> dict[str, EvalPlan]:
    """One `plan_eval` per named set; an empty set's error names it."""
    plans: dict[str, EvalPlan] = {}
    for name, texts in eval_sets.items():
        try:
            plans[name] = plan_eval(tokenizer, texts, cfg, common_ids=common_ids)
        except EmptyDatasetError as exc:
            raise EmptyDatasetError(f"eval set {name!r}: {exc}") from exc
    return plans


def evaluate_sets(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    eval_sets: Mapping[str, Sequence[str]],
    cfg: EvalConfig,
    *,
    common_ids: Sequence[int] | None = None,
    plans: Mapping[str, EvalPlan] | None = None,
) -> dict[str, EvalResult]:
    """Evaluate every named set with one shared common-token list.

    When `common_ids` is None the `cfg.skip_common` most common targets of all sets together are
    computed here; runs compute them once and pass them in so every step skips the same tokens, and
    pass the sets' `plans` (from `plan_sets`, with the same common ids) so they are tokenized once.
    """
    if common_ids is None:
        union = [text for texts in eval_sets.values() for text in texts]
        common_ids = common_target_ids(tokenizer, union, n=cfg.skip_common, token_limit=cfg.token_limit)
    if plans is None:
        plans = plan_sets(tokenizer, eval_sets, cfg, common_ids=common_ids)
    results: dict[str, EvalResult] = {}
    for name in eval_sets:
        results[name] = evaluate_plan(model, plans[name], cfg, common_ids=common_ids)
        log.info(
            "eval %s: top1 %.4f skip_top1 %.4f loss %.4f over %d tokens",
            name,
            results[name].top1,
            results[name].skip_top1,
            results[name].loss,
            results[name].n_tokens,
        )
    return results
