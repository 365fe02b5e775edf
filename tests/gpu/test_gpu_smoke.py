"""Run with `./dev test tests/gpu --device cuda` on a machine with a GPU; skipped otherwise."""

from __future__ import annotations

import pytest
import torch

from selprune_core.config import CollectConfig, EvalConfig, PruneConfig, SamplingConfig
from selprune_core.generation import generate
from selprune_core.loading import LoadedModel
from selprune_core.masking import apply_mask, fold_into_weights
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
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        ref="tiny-llama",
        fingerprint=model_fingerprint(model),
        device=torch.device(device),
        dtype=dtype,
        sites=sites,
    )
    result = prune_iteratively(
        loaded,
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


def test_mixed_mask_batch_on_cuda_matches_rows_alone(tiny_model, tokenizer, device):
    """The serving path on the device: per-row masks gathered from a device-resident MaskTable."""
    from selprune_core.generation import GenerationRow, encode_prompts, generate_rows
    from selprune_core.masking import apply_row_masks
    from selprune_core.masks import NeuronMask
    from worker.mask_table import MaskTable

    model = tiny_model("llama").to(device=device)
    sites, fingerprint = resolve_sites(model), model_fingerprint(model)
    table = MaskTable(sites, fingerprint, torch.device(device), capacity=4)
    g = torch.Generator().manual_seed(0)
    masks = [
        NeuronMask(
            fingerprint,
            torch.rand(sites.n_layers, sites.d_mlp, generator=g) > 0.4,
            torch.rand(sites.n_layers, sites.d_attn, generator=g) > 0.4,
            sites.n_heads,
            # The first is a mean-ablation mask: its offsets ride the device-resident offset table.
            torch.randn(sites.n_layers, sites.d_mlp, generator=g) if i == 0 else None,
            torch.randn(sites.n_layers, sites.d_attn, generator=g) if i == 0 else None,
        )
        for i in range(3)
    ]
    slots = [table.add(m) for m in masks] + [0]
    rows = [
        GenerationRow(ids, SamplingConfig(max_new_tokens=8, temperature=0.0))
        for ids in encode_prompts(tokenizer, CORPUS[:4])
    ]
    param = next(model.parameters())
    factors = table.factors(slots, param.dtype)
    # Three of the four rows are masked, one with offsets.
    assert factors is not None and factors.ff_offset is not None
    with apply_row_masks(sites, factors):
        mixed = [gen.token_ids for gen in generate_rows(model, tokenizer, rows)]
    for row, slot in zip(rows, slots, strict=True):
        row_factors = table.factors([slot], param.dtype)
        if row_factors is None:  # the unmasked row: no hooks
            alone = generate_rows(model, tokenizer, [row])
        else:
            with apply_row_masks(sites, row_factors):
                alone = generate_rows(model, tokenizer, [row])
        assert alone[0].token_ids == mixed[rows.index(row)]
