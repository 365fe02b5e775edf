"""Gradient steps through a mask: descent lowers the loss, ascent raises it, the weights behind pruned
neurons never move, and task arithmetic is base - alpha * (tuned - base)."""

from __future__ import annotations

import copy

import pytest
import torch

from selprune_core.config import EvalConfig
from selprune_core.errors import ConfigError, EmptyDatasetError
from selprune_core.evaluation import evaluate_texts
from selprune_core.finetune import FinetuneConfig, finetune, subtract_task_vector
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.sites import model_fingerprint, resolve_sites
from tests.helpers import CORPUS

CODE = [t for t in CORPUS if "def " in t or "class " in t] or CORPUS[:2]
PROSE = [t for t in CORPUS if t not in CODE]
CFG = FinetuneConfig(steps=8, learning_rate=3e-3, batch_size=2, token_limit=32)


def _loss(model, tokenizer, texts, sites=None, mask=None) -> float:
    cfg = EvalConfig(token_limit=32, bootstrap_samples=0)
    if mask is None:
        return evaluate_texts(model, tokenizer, texts, cfg).loss
    with apply_mask(model, sites, mask):
        return evaluate_texts(model, tokenizer, texts, cfg).loss


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_descent_lowers_and_ascent_raises_the_forget_loss(tiny_model, tokenizer, arch):
    base = tiny_model(arch)
    before = _loss(base, tokenizer, CODE)
    down, up = copy.deepcopy(base), copy.deepcopy(base)
    report = finetune(down, tokenizer, CODE, CFG)
    assert len(report.forget_losses) == CFG.steps and report.tokens > 0 and not report.retain_losses
    assert _loss(down, tokenizer, CODE) < before
    finetune(up, tokenizer, CODE, FinetuneConfig(**{**CFG.__dict__, "objective": "ascent"}))
    assert _loss(up, tokenizer, CODE) > before
    assert not down.training and not up.training


def test_gradient_difference_reports_both_sets(tiny_model, tokenizer):
    model = tiny_model("llama")
    cfg = FinetuneConfig(**{**CFG.__dict__, "objective": "difference"})
    report = finetune(model, tokenizer, CODE, cfg, retain_texts=PROSE)
    assert len(report.retain_losses) == len(report.forget_losses) == cfg.steps
    with pytest.raises(ConfigError, match="needs retain texts"):
        finetune(model, tokenizer, CODE, cfg)


def test_relearning_through_a_mask_never_moves_the_pruned_neurons(tiny_model, tokenizer):
    model = tiny_model("llama")
    sites = resolve_sites(model)
    g = torch.Generator().manual_seed(0)
    ff = torch.rand(sites.n_layers, sites.d_mlp, generator=g) > 0.5
    attn = torch.ones(sites.n_layers, sites.d_attn, dtype=torch.bool)
    mask = NeuronMask(model_fingerprint(model), ff, attn, sites.n_heads)
    before = [m.weight.detach().clone() for m in sites.ff_modules]  # down_proj [hidden, d_mlp]
    masked_before = _loss(model, tokenizer, CODE, sites, mask)
    finetune(model, tokenizer, CODE, CFG, sites=sites, mask=mask)
    for layer, module in enumerate(sites.ff_modules):
        pruned = ~ff[layer]
        assert torch.equal(module.weight[:, pruned], before[layer][:, pruned])  # no gradient reached them
        assert not torch.equal(module.weight[:, ~pruned], before[layer][:, ~pruned])
    assert _loss(model, tokenizer, CODE, sites, mask) < masked_before


def test_task_arithmetic_subtracts_the_scaled_delta(tiny_model, tokenizer):
    base = tiny_model("llama")
    tuned = copy.deepcopy(base)
    finetune(tuned, tokenizer, CODE, CFG)
    model = copy.deepcopy(base)
    subtract_task_vector(model, base, tuned, alpha=0.5)
    for (name, p), b, t in zip(model.named_parameters(), base.parameters(), tuned.parameters(), strict=True):
        torch.testing.assert_close(p, b - 0.5 * (t - b), msg=name)


def test_no_usable_text_is_a_clear_error(tiny_model, tokenizer):
    with pytest.raises(EmptyDatasetError, match="forget"):
        finetune(tiny_model("llama"), tokenizer, ["", "  "], CFG)


def test_a_frozen_model_trains_and_stays_frozen(tiny_model, tokenizer):
    model = tiny_model("llama").requires_grad_(False)  # as load_model returns models
    before = _loss(model, tokenizer, CODE)
    finetune(model, tokenizer, CODE, CFG)
    assert _loss(model, tokenizer, CODE) < before
    assert not any(p.requires_grad for p in model.parameters())


def test_on_step_sees_each_checkpoint_in_eval_mode(tiny_model, tokenizer):
    model, seen = tiny_model("llama"), []
    finetune(model, tokenizer, CODE, CFG, on_step=lambda step: seen.append((step, model.training)))
    assert seen == [(step, False) for step in range(1, CFG.steps + 1)]
