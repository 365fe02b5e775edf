from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from selprune_core.config import EvalConfig
from selprune_core.errors import EmptyDatasetError
from selprune_core.evaluation import (
    common_target_ids,
    evaluate_plan,
    evaluate_sets,
    evaluate_texts,
    plan_eval,
    relative_drop,
)
from tests.helpers import CORPUS, build_model, build_tokenizer

TEXTS = CORPUS + ["the cat", "", "x", "the dog sat on the mat and the cat sat on the log and the fox"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tokenizer):
    return build_model(request.param, tokenizer)


def direct_stats(model, tokenizer, texts, token_limit, k, common):
    """Score each text alone, batch 1, no padding: the reference the batched path must match."""
    n = top1 = topk = n_skip = skip_top1 = ce_sum = 0.0
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=token_limit, return_tensors="pt")["input_ids"]
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        targets = ids[0, 1:]
        hits1 = logits.argmax(-1) == targets
        hitsk = (logits.topk(k, dim=-1).indices == targets[:, None]).any(-1)
        skip = torch.tensor([t not in common for t in targets.tolist()])
        n += targets.numel()
        top1 += hits1.sum().item()
        topk += hitsk.sum().item()
        n_skip += skip.sum().item()
        skip_top1 += (hits1 & skip).sum().item()
        ce_sum += F.cross_entropy(logits, targets, reduction="sum").item()
    return dict(
        top1=top1 / n, topk=topk / n, skip_top1=skip_top1 / n_skip, loss=ce_sum / n, n=n, n_skip=n_skip
    )


def test_metrics_match_unbatched_reference(model, tokenizer):
    cfg = EvalConfig(token_limit=12, batch_size=3, topk=5, bootstrap_samples=50)
    common = common_target_ids(tokenizer, TEXTS, n=5, token_limit=12)
    result = evaluate_texts(model, tokenizer, TEXTS, cfg, common_ids=common)
    ref = direct_stats(model, tokenizer, TEXTS, 12, 5, set(common))
    assert result.n_tokens == ref["n"]
    assert result.n_skip_tokens == ref["n_skip"] < ref["n"]
    assert result.n_texts == len(TEXTS) - 1  # "" is BOS alone: no prediction, skipped
    for name in ("top1", "topk", "skip_top1", "loss"):
        assert getattr(result, name) == pytest.approx(ref[name], abs=1e-5), name
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-9)
    assert result.legacy_perplexity >= result.perplexity  # Jensen: mean(exp) >= exp(mean)


def test_common_ids_are_most_frequent_targets(tokenizer):
    texts = ["the the the cat", "the cat dog"]
    the, space_the, space_cat = (
        tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("the", " the", " cat")
    )
    # targets: the, _the, _the, _cat | the, _cat, _dog -> three ids tie at 2, broken by smaller id
    assert common_target_ids(tokenizer, texts, n=3, token_limit=50) == tuple(
        sorted([the, space_the, space_cat])
    )
    # truncation to 3 tokens keeps targets the, _the | the, _cat
    assert common_target_ids(tokenizer, texts, n=1, token_limit=3) == (the,)
    assert tokenizer.bos_token_id not in common_target_ids(tokenizer, texts, n=50, token_limit=50)
    assert common_target_ids(tokenizer, texts, n=0, token_limit=50) == ()


def test_skip_metrics_exclude_common_ids(tokenizer):
    model = build_model("llama", tokenizer)
    cfg = EvalConfig(token_limit=16, bootstrap_samples=0)
    plain = evaluate_texts(model, tokenizer, TEXTS, cfg)
    assert plain.skip_top1 == plain.top1 and plain.n_skip_tokens == plain.n_tokens
    everything = set(range(len(tokenizer)))
    none_left = evaluate_texts(model, tokenizer, TEXTS, cfg, common_ids=sorted(everything))
    assert none_left.n_skip_tokens == 0 and math.isnan(none_left.skip_top1)
    assert none_left.as_dict()["skip_top1"] is None
    assert none_left.ci == {}


def test_bootstrap_ci_brackets_estimate_and_is_seeded(tokenizer):
    model = build_model("llama", tokenizer)
    cfg = EvalConfig(token_limit=16, bootstrap_samples=200, seed=3)
    a = evaluate_texts(model, tokenizer, TEXTS, cfg)
    b = evaluate_texts(model, tokenizer, TEXTS, cfg)
    assert a == b
    assert set(a.ci) >= {"top1", "topk", "skip_top1", "loss", "perplexity"}
    for name, (lo, hi) in a.ci.items():
        assert lo <= getattr(a, name) <= hi, name
    c = evaluate_texts(model, tokenizer, TEXTS, EvalConfig(token_limit=16, bootstrap_samples=200, seed=4))
    assert c.ci != a.ci and c.loss == a.loss
    d = a.as_dict()
    assert isinstance(d["ci"]["loss"], list) and d["n_texts"] == a.n_texts


def test_sample_tokens_budget_stops_early(tokenizer):
    model = build_model("llama", tokenizer)
    full = evaluate_texts(
        model, tokenizer, TEXTS, EvalConfig(token_limit=16, batch_size=2, bootstrap_samples=0)
    )
    short = evaluate_texts(
        model,
        tokenizer,
        TEXTS,
        EvalConfig(token_limit=16, batch_size=2, sample_tokens=5, bootstrap_samples=0),
    )
    # Texts in order until more than 5 skip predictions: the first text already has 15.
    assert short.n_texts == 1 < full.n_texts
    assert short.n_skip_tokens > 5
    # The plan stops at the text that crosses the budget, whatever the batch size.
    cfg = EvalConfig(token_limit=16, batch_size=2, sample_tokens=20, bootstrap_samples=0)
    plan = plan_eval(tokenizer, TEXTS, cfg)
    ids = [tokenizer(t, truncation=True, max_length=16)["input_ids"] for t in TEXTS]
    covered = [sum(len(i) - 1 for i in ids[: n + 1]) for n in range(len(ids))]
    assert plan.n_texts == next(n + 1 for n, c in enumerate(covered) if c > 20)


def test_length_sorted_batches_give_the_in_order_results(tokenizer):
    """Batching by length changes neither a metric nor the per-text rows the intervals resample."""
    model = build_model("llama", tokenizer)
    texts = [TEXTS[i % len(TEXTS)] * (1 + i % 3) for i in range(9)]  # unequal lengths, out of order
    cfg = EvalConfig(token_limit=40, batch_size=2, bootstrap_samples=100)
    plan = plan_eval(tokenizer, texts, cfg)
    widths = [b.input_ids.shape[1] for b in plan.batches]
    assert widths == sorted(widths, reverse=True)  # longest first
    assert sorted(i for b in plan.batches for i in b.text_index) == list(range(9))
    batched = evaluate_plan(model, plan, cfg)
    one_by_one = [evaluate_texts(model, tokenizer, [t], replace(cfg, bootstrap_samples=0)) for t in texts]
    assert batched.n_tokens == sum(r.n_tokens for r in one_by_one)
    mean_loss = sum(r.loss * r.n_tokens for r in one_by_one) / batched.n_tokens
    assert batched.loss == pytest.approx(mean_loss, rel=1e-5)
    top1 = sum(r.top1 * r.n_tokens for r in one_by_one) / batched.n_tokens
    assert batched.top1 == pytest.approx(top1, rel=1e-6)


def test_empty_texts_raise(tokenizer):
    model = build_model("llama", tokenizer)
    with pytest.raises(EmptyDatasetError, match="fewer than 2 tokens"):
        evaluate_texts(model, tokenizer, ["", ""], EvalConfig())
    with pytest.raises(EmptyDatasetError, match="'empty'"):
        evaluate_sets(model, tokenizer, {"ok": TEXTS, "empty": [""]}, EvalConfig(bootstrap_samples=0))


def test_evaluate_sets_shares_common_ids(tokenizer):
    model = build_model("gpt2", tokenizer)
    cfg = EvalConfig(token_limit=16, skip_common=3, bootstrap_samples=0)
    sets = {"a": TEXTS[:4], "b": TEXTS[4:]}
    out = evaluate_sets(model, tokenizer, sets, cfg)
    common = common_target_ids(tokenizer, TEXTS, n=3, token_limit=16)
    assert out["b"] == evaluate_texts(model, tokenizer, sets["b"], cfg, common_ids=common)


def test_relative_drop():
    assert relative_drop(0.5, 0.25) == 0.5
    assert relative_drop(0.0, 0.1) == 0.0
    assert relative_drop(0.4, 0.5) == pytest.approx(-0.25)
