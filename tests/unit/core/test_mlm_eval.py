"""Masked-token evaluation on tiny random RoBERTa and BERT masked LMs: the metrics equal a direct
computation one text at a time, and the masking is BERT's recipe, seeded, stated and independent of
batching."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from selprune_core import mlm_eval
from selprune_core.config import EvalConfig
from selprune_core.errors import ConfigError, EmptyDatasetError
from selprune_core.evaluation import N_PRED, N_SKIP
from selprune_core.mlm_eval import (
    MlmMasking,
    common_mlm_targets,
    evaluate_mlm,
    mask_text,
    mlm_rows,
    mlm_vocab,
    plan_mlm,
    text_generator,
)
from tests.helpers import CORPUS
from tests.mlm_helpers import MLM_TYPES, tiny_mlm

TEXTS = [*CORPUS, "", *(f"{text} {text}" for text in CORPUS)]  # one with no non-special token
CFG = EvalConfig(token_limit=40, topk=5, batch_size=3, bootstrap_samples=0, seed=7, skip_common=0)


@pytest.fixture(scope="module", params=MLM_TYPES)
def mlm(request):
    return tiny_mlm(request.param)


def _plan_tuples(plan):
    """{(text index, position): (corrupted id, target)} of every prediction in a plan."""
    out = {}
    for batch in plan.batches:
        for row, col, target in zip(
            batch.rows.tolist(), batch.cols.tolist(), batch.targets.tolist(), strict=True
        ):
            index = batch.tokens.text_index[row]
            out[(index, col)] = (int(batch.tokens.input_ids[row, col]), target)
    return out


@torch.no_grad()
def test_metrics_equal_a_direct_computation_one_text_at_a_time(mlm):
    """Each text alone, unpadded: choose the positions, corrupt them, score the full model's logits."""
    tok, model = mlm.tokenizer, mlm.model
    vocab = mlm_vocab(tok)
    n = top1 = topk = 0
    ce = 0.0
    for text in TEXTS:
        ids = tok(text, truncation=True, max_length=CFG.token_limit)["input_ids"]
        corrupted, chosen = mask_text(ids, vocab, MlmMasking(), text_generator(CFG.seed, ids))
        if not chosen:
            continue
        logits = model(input_ids=torch.tensor([corrupted])).logits[0, chosen]  # [pred, vocab]
        targets = torch.tensor([ids[pos] for pos in chosen])
        n += len(chosen)
        top1 += int((logits.argmax(-1) == targets).sum())
        topk += int((logits.topk(CFG.topk, dim=-1).indices == targets[:, None]).any(-1).sum())
        ce += float(F.cross_entropy(logits, targets, reduction="sum"))
    result = evaluate_mlm(model, tok, TEXTS, CFG)
    assert result.n_tokens == n and result.n_texts == len(TEXTS) - 1  # the blank text has no prediction
    assert result.top1 == pytest.approx(top1 / n) and result.topk == pytest.approx(topk / n)
    assert result.loss == pytest.approx(ce / n, rel=1e-5)
    assert result.skip_top1 == pytest.approx(result.top1)  # no common-token list: every target counts


def test_masking_follows_the_stated_recipe():
    """15% of the non-special positions (rounded), 80% -> mask, 10% -> a random non-special id, 10% kept."""
    tok = tiny_mlm("roberta").tokenizer
    vocab = mlm_vocab(tok)
    assert vocab.mask_id == len(tok) - 1 and vocab.special_ids == {0, 1, 2, 3, len(tok) - 1}
    assert vocab.candidates.tolist() == list(range(4, len(tok) - 1))  # method.md's [4, vocab - 2]
    body = torch.randint(4, len(tok) - 1, (20_000,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = [0, *body, 2]
    corrupted, chosen = mask_text(ids, vocab, MlmMasking(), torch.Generator().manual_seed(1))
    assert len(chosen) == round(0.15 * 20_000) and 0 not in chosen and len(ids) - 1 not in chosen
    assert chosen == sorted(set(chosen))
    unchosen = set(range(len(ids))) - set(chosen)
    assert all(corrupted[pos] == ids[pos] for pos in unchosen)
    masked = sum(corrupted[pos] == vocab.mask_id for pos in chosen) / len(chosen)
    same = sum(corrupted[pos] == ids[pos] for pos in chosen) / len(chosen)
    chance = 0.1 / len(vocab.candidates)  # a random replacement may draw the original id
    assert masked == pytest.approx(0.8, abs=0.03) and same == pytest.approx(0.1 + chance, abs=0.03)
    assert all(corrupted[pos] not in vocab.special_ids - {vocab.mask_id} for pos in chosen)
    # a short text still gets one prediction; specials alone get none
    assert len(mask_text([0, 5, 2], vocab, MlmMasking(), torch.Generator())[1]) == 1
    assert mask_text([0, 2], vocab, MlmMasking(), torch.Generator()) == ([], [])
    with pytest.raises(ConfigError):
        MlmMasking(to_mask=0.9, to_random=0.2)


def test_bert_specials_are_never_chosen_nor_drawn():
    tok = tiny_mlm("bert").tokenizer
    vocab = mlm_vocab(tok)
    assert vocab.special_ids == {0, 1, 2, 3, 4} and vocab.mask_id == 4
    assert vocab.candidates.min() == 5
    ids = tok(" ".join(CORPUS))["input_ids"]
    for seed in range(20):
        corrupted, chosen = mask_text(ids, vocab, MlmMasking(), text_generator(seed, ids))
        assert chosen and not {ids[pos] for pos in chosen} & vocab.special_ids
        assert corrupted[0] == ids[0] == tok.cls_token_id


def test_masking_is_seeded_and_independent_of_batch_size_and_order(mlm):
    tok, model = mlm.tokenizer, mlm.model
    plans = [plan_mlm(tok, TEXTS, dataclasses.replace(CFG, batch_size=b), token_limit=40) for b in (1, 2, 5)]
    positions = [_plan_tuples(plan) for plan in plans]
    assert positions[0] == positions[1] == positions[2]
    assert len({len(plan.batches) for plan in plans}) == 3  # really batched differently
    # the same text masks the same way wherever it sits in its set
    reversed_plan = _plan_tuples(plan_mlm(tok, TEXTS[::-1], CFG, token_limit=40))
    last = len(TEXTS) - 1
    assert {(last - i, pos): v for (i, pos), v in reversed_plan.items()} == positions[0]
    other_seed = _plan_tuples(plan_mlm(tok, TEXTS, EvalConfig(token_limit=40, seed=8), token_limit=40))
    assert other_seed != positions[0]
    rows = [mlm_rows(model, plan, CFG) for plan in plans]
    torch.testing.assert_close(rows[0], rows[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rows[0], rows[2], rtol=1e-4, atol=1e-4)


def test_sample_budget_common_targets_and_empty_sets(mlm):
    tok = mlm.tokenizer
    common = common_mlm_targets(tok, TEXTS, n=3, token_limit=40)
    assert len(common) == 3 and not set(common) & set(tok.all_special_ids)
    small = plan_mlm(tok, TEXTS, EvalConfig(sample_tokens=5, seed=7), token_limit=40, common_ids=common)
    rows = mlm_rows(mlm.model, small, CFG, common_ids=common)
    # texts in order until more than 5 skip targets
    assert rows[:-1, N_SKIP].sum() <= 5 < rows[:, N_SKIP].sum()
    assert (rows[:, N_SKIP] <= rows[:, N_PRED]).all()
    with pytest.raises(EmptyDatasetError):
        plan_mlm(tok, ["", ""], CFG, token_limit=40)


def test_the_full_forward_fallback_gives_the_same_rows(mlm):
    """Where body + head cannot stand in for the model, the full logits are read at the same positions."""
    plan = plan_mlm(mlm.tokenizer, TEXTS, CFG, token_limit=40)
    split = mlm_rows(mlm.model, plan, CFG)
    mlm_eval._HEADS[mlm.model] = None  # the verdict a model whose head does not reproduce its logits gets
    try:
        full = mlm_rows(mlm.model, plan, CFG)
    finally:
        del mlm_eval._HEADS[mlm.model]
    torch.testing.assert_close(full, split, rtol=1e-5, atol=1e-5)
