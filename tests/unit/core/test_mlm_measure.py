"""The masked-LM RunMeasure on tiny random RoBERTa and BERT: statistics of unmasked texts equal a direct
computation, a PruneRun takes two steps, its mask equals zeroed weight columns in the outputs, and a
saved *ForMaskedLM folder loads as a masked LM."""

from __future__ import annotations

import copy

import pytest
import torch

from selprune_core.activations import STAT_FIELDS
from selprune_core.config import CollectConfig, EvalConfig, PruneConfig
from selprune_core.errors import ConfigError, ModelLoadError
from selprune_core.masking import apply_mask, fold_into_weights
from selprune_core.masks import NeuronMask
from selprune_core.mlm_eval import evaluate_mlm
from selprune_core.mlm_measure import MlmMeasure, load_masked_lm, masked_lm, max_tokens
from selprune_core.pruning import PruneCallbacks, PruneRun
from tests.helpers import build_model, build_tokenizer, random_mask, site_inputs
from tests.mlm_helpers import CODE, MAX_POSITIONS, MLM_TYPES, PROSE, build_mlm_model, tiny_mlm

EVAL = EvalConfig(token_limit=48, topk=5, batch_size=3, bootstrap_samples=50, skip_common=2, seed=3)
CFG = PruneConfig(
    ff_frac=0.1,
    attn_frac=0.05,
    steps=2,
    collect=CollectConfig(token_limit=1000, batch_size=3, sample_tokens=10**6),  # clamped to the model
    eval=EVAL,
)


@pytest.fixture(scope="module", params=MLM_TYPES)
def mlm(request):
    return tiny_mlm(request.param)


def _measure(mlm, cfg=CFG, callbacks=None):
    eval_sets = {"forget": CODE, "retain": PROSE}
    return MlmMeasure(mlm, cfg, (CODE, PROSE), eval_sets, callbacks=callbacks)


def test_token_limits_are_clamped_to_the_positions(mlm):
    # RoBERTa numbers positions from pad id + 1 = 2, BERT from 0.
    assert mlm.max_tokens == MAX_POSITIONS - (2 if mlm.sites.model_type == "roberta" else 0)
    measure = _measure(mlm)
    assert measure.collect_limit == mlm.max_tokens and measure.eval_limit == 48


def test_statistics_of_unmasked_texts_equal_a_direct_computation(mlm):
    measure = _measure(mlm)
    mask = random_mask(mlm.model, seed=1)
    stats = measure.collect(CODE, mask, 1, "collecting_forget", STAT_FIELDS)

    def one_text_at_a_time() -> None:  # batch 1, no padding, no token masked
        for text in CODE:
            mlm.model(input_ids=mlm.tokenizer(text, return_tensors="pt")["input_ids"])

    with apply_mask(mlm.model, mlm.sites, mask):  # its hooks first, so the capture sees masked inputs
        direct = site_inputs(mlm.sites, one_text_at_a_time, flatten=True)  # [layer, tokens, d]
    n_tokens = sum(len(mlm.tokenizer(text)["input_ids"]) for text in CODE)
    assert stats.n_tokens == n_tokens == direct["ff"].shape[1] and stats.n_texts == len(CODE)
    for got, x in ((stats.ff, direct["ff"]), (stats.attn, direct["attn"])):
        torch.testing.assert_close(got.sum, x.sum(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.sum_sq, (x * x).sum(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.sum_abs, x.abs().sum(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.sum_sqrt, x.abs().sqrt().sum(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.pos_count, (x > 0).double().sum(1), rtol=0, atol=0)
    # pruned neurons read exactly 0
    assert (stats.ff.sum_abs[~mask.ff_keep] == 0).all() and (stats.attn.sum_abs[~mask.attn_keep] == 0).all()


@torch.no_grad()
def test_a_run_takes_two_steps_and_its_mask_equals_zeroed_weights(mlm):
    masks: list[NeuronMask] = []
    callbacks = PruneCallbacks(on_step=lambda _report, mask: masks.append(mask))
    measure = _measure(mlm, callbacks=callbacks)
    result = PruneRun.with_measure(mlm, measure, ["forget", "retain"], CFG, callbacks=callbacks).run_to_end()
    assert [r.step for r in result.history] == [0, 1, 2] and len(masks) == 3
    sites = mlm.sites
    ff_total, attn_total = sites.n_layers * sites.d_mlp, sites.n_layers * sites.d_attn
    final = result.mask
    assert int((~final.ff_keep).sum()) == 2 * int(0.1 * ff_total)
    assert int((~final.attn_keep).sum()) == 2 * int(0.05 * attn_total)
    report = result.history[-1]
    assert set(report.metrics) == {"forget", "retain"} and "ci" in report.metrics["forget"]
    # The measure's step-2 evaluation is the masked-token evaluation of the masked model ...
    with apply_mask(mlm.model, sites, final):
        hooked = evaluate_mlm(mlm.model, mlm.tokenizer, CODE, EVAL, common_ids=measure.eval_common)
    assert report.metrics["forget"]["top1"] == pytest.approx(hooked.top1)
    assert report.metrics["forget"]["loss"] == pytest.approx(hooked.loss)
    # ... and the mask is the weights with those columns zeroed: same logits, same metrics.
    folded = copy.deepcopy(mlm.model)
    fold_into_weights(folded, masked_lm(folded, mlm.tokenizer).sites, final)
    batch = mlm.tokenizer(CODE, padding=True, return_tensors="pt")
    with apply_mask(mlm.model, sites, final):
        expected = mlm.model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(folded(**batch).logits[real], expected[real], rtol=0, atol=1e-5)
    pruned_effect = (folded(**batch).logits - mlm.model(**batch).logits)[real].abs().max()
    assert pruned_effect > 1e-4  # pruning did something
    again = evaluate_mlm(folded, mlm.tokenizer, CODE, EVAL, common_ids=measure.eval_common)
    assert again.top1 == pytest.approx(hooked.top1) and again.loss == pytest.approx(hooked.loss, rel=1e-5)


def test_random_baseline_and_mean_ablation_run_too(mlm):
    cfg = PruneConfig(ff_frac=0.1, steps=1, random_baseline=True, offset_mode="retain_mean", eval=EVAL,
                      collect=CollectConfig(batch_size=4))  # fmt: skip
    result = PruneRun.with_measure(mlm, _measure(mlm, cfg), ["forget", "retain"], cfg).run_to_end()
    assert result.mask.ff_offset is not None and int((~result.mask.ff_keep).sum()) > 0


def test_unsupported_settings_are_refused_before_any_work(mlm):
    with pytest.raises(ConfigError, match="gradient"):
        _measure(mlm, PruneConfig(ff_scoring="taylor"))
    with pytest.raises(ConfigError, match="packed"):
        _measure(mlm, PruneConfig(collect=CollectConfig(pack=True)))


def test_a_saved_masked_lm_folder_loads_as_one(tmp_path):
    for model_type in MLM_TYPES:
        original = tiny_mlm(model_type)
        folder = tmp_path / model_type
        original.model.save_pretrained(folder)
        original.tokenizer.save_pretrained(folder)
        loaded = load_masked_lm(folder)
        assert type(loaded.model) is type(original.model)
        assert loaded.fingerprint == original.fingerprint and loaded.max_tokens == max_tokens(original.model)
        assert loaded.tokenizer.mask_token_id == original.tokenizer.mask_token_id
        assert not any(p.requires_grad for p in loaded.model.parameters())
        ids = original.tokenizer(CODE[0], return_tensors="pt")["input_ids"]
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, original.model(input_ids=ids).logits)
    causal = tmp_path / "causal"
    tokenizer = build_tokenizer()
    build_model("gpt2", tokenizer).save_pretrained(causal)
    tokenizer.save_pretrained(causal)
    with pytest.raises(ModelLoadError, match="masked LM"):
        load_masked_lm(causal)
    with pytest.raises(ModelLoadError, match="config.json"):
        load_masked_lm(tmp_path / "missing")


def test_a_tokenizer_whose_pad_id_differs_from_roberta_positions_is_refused():
    roberta = tiny_mlm("roberta")
    bert_tokenizer = tiny_mlm("bert").tokenizer  # pad id 0, RoBERTa's positions expect 1
    with pytest.raises(ModelLoadError, match="pad id"):
        masked_lm(build_mlm_model("roberta", roberta.tokenizer), bert_tokenizer)
