"""Run with `./dev test tests/gpu --device cuda` on a machine with a GPU; skipped otherwise."""

from __future__ import annotations

import pytest
import torch

from selprune_core.config import CollectConfig, EvalConfig, PruneConfig, SamplingConfig
from selprune_core.generation import generate
from selprune_core.masks import apply_mask, fold_into_weights
from selprune_core.pruning import prune_iteratively
from selprune_core.sites import model_fingerprint, resolve_sites
from tests.helpers import CORPUS

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prune_and_masked_generation_on_cuda(tiny_model, tokenizer, device, dtype):
    model = tiny_model("llama").to(device=device, dtype=dtype)
    sites = resolve_sites(model)
    cfg = PruneConfig(
        ff_frac=0.1,
        attn_frac=0.05,
        steps=2,
        collect=CollectConfig(token_limit=64, sample_tokens=2000, batch_size=4),
        eval=EvalConfig(token_limit=64, sample_tokens=500, batch_size=4, bootstrap_samples=50),
    )
    result = prune_iteratively(
        model,
        tokenizer,
        sites,
        model_fingerprint(model),
        CORPUS[1::2],
        CORPUS[0::2],
        {"forget": CORPUS[1::2], "retain": CORPUS[0::2]},
        cfg,
    )
    assert result.mask.pruned_counts()["ff"] > 0
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    with apply_mask(model, sites, result.mask):
        masked = [g.token_ids for g in generate(model, tokenizer, CORPUS[:3], greedy)]
    fold_into_weights(model, sites, result.mask)
    folded = [g.token_ids for g in generate(model, tokenizer, CORPUS[:3], greedy)]
    assert masked == folded
