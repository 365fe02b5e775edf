from __future__ import annotations

import threading

import pytest
import torch

from selprune_core.activations import ComponentStats, record_activations
from selprune_core.errors import MaskMismatchError
from selprune_core.masks import NeuronMask, apply_mask, fold_into_weights
from selprune_core.sites import model_fingerprint, resolve_sites
from tests.helpers import ARCHS, CORPUS


def _random_mask(model, frac=0.3, seed=0):
    sites = resolve_sites(model)
    g = torch.Generator().manual_seed(seed)
    ff = torch.rand(sites.n_layers, sites.d_mlp, generator=g) > frac
    attn = torch.rand(sites.n_layers, sites.d_attn, generator=g) > frac
    return sites, NeuronMask(model_fingerprint(model), ff, attn, sites.n_heads)


def _batch(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_mask_equals_weight_zeroing_and_exit_restores(tiny_model, tokenizer, arch):
    model = tiny_model(arch)
    sites, mask = _random_mask(model)
    ids, attn = _batch(tokenizer, CORPUS[:4])
    before = model(input_ids=ids, attention_mask=attn).logits
    with apply_mask(model, sites, mask, fingerprint=mask.fingerprint):
        masked = model(input_ids=ids, attention_mask=attn).logits
    after = model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(before, after)  # hooks gone, logits restored exactly
    assert (masked - before).abs().max() > 1e-4  # the mask did something
    fold_into_weights(model, sites, mask)
    folded = model(input_ids=ids, attention_mask=attn).logits
    assert (folded - masked).abs().max().item() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox"])
def test_per_row_masks_match_each_row_alone(tiny_model, tokenizer, arch):
    model = tiny_model(arch)
    sites, m1 = _random_mask(model, seed=1)
    _, m2 = _random_mask(model, seed=2)
    full = NeuronMask.full(sites, m1.fingerprint)
    rows = [m1, m2, full]
    ids, attn = _batch(tokenizer, CORPUS[:3])
    with apply_mask(model, sites, rows):
        mixed = model(input_ids=ids, attention_mask=attn).logits
    for i, m in enumerate(rows):
        with apply_mask(model, sites, m):
            alone = model(input_ids=ids[i : i + 1], attention_mask=attn[i : i + 1]).logits
        valid = attn[i].bool()
        torch.testing.assert_close(mixed[i][valid], alone[0][valid], rtol=1e-4, atol=1e-4)


def test_id_is_content_addressed_and_roundtrips(tiny_model, tmp_path):
    model = tiny_model("llama")
    sites, mask = _random_mask(model)
    same = NeuronMask(mask.fingerprint, mask.ff_keep.clone(), mask.attn_keep.clone(), mask.n_heads)
    assert same.mask_id == mask.mask_id and same == mask
    flipped = mask.ff_keep.clone()
    flipped[0, 0] = ~flipped[0, 0]
    assert NeuronMask(mask.fingerprint, flipped, mask.attn_keep, mask.n_heads).mask_id != mask.mask_id
    assert NeuronMask("other", mask.ff_keep, mask.attn_keep, mask.n_heads).mask_id != mask.mask_id
    path = mask.save(tmp_path, {"name": "demo"})
    loaded = NeuronMask.load(path)
    assert loaded.mask_id == mask.mask_id and torch.equal(loaded.attn_keep, mask.attn_keep)
    assert (tmp_path / f"{mask.mask_id}.json").exists()
    assert NeuronMask.from_bytes(mask.to_bytes()).mask_id == mask.mask_id
    # Packed bits: one bit per neuron, in memory and in the stored file (plus a small header).
    n_bits = mask.ff_keep.numel() + mask.attn_keep.numel()
    assert len(mask.packed_bits()) == (n_bits + 7) // 8
    assert len(mask.to_bytes()) < n_bits // 8 + 1024


def test_union_intersection_and_counts(tiny_model):
    model = tiny_model("gpt2")
    sites, a = _random_mask(model, seed=1)
    _, b = _random_mask(model, seed=2)
    union, inter = a.union(b), a.intersection(b)
    assert torch.equal(~union.ff_keep, ~a.ff_keep | ~b.ff_keep)
    assert torch.equal(~inter.attn_keep, ~a.attn_keep & ~b.attn_keep)
    counts = union.pruned_counts()
    assert counts["ff"] == int((~union.ff_keep).sum()) == sum(counts["ff_per_layer"])
    assert counts["ff_total"] == sites.n_layers * sites.d_mlp


def test_mismatch_errors(tiny_model, tokenizer):
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    _, mask = _random_mask(llama)
    with pytest.raises(MaskMismatchError, match="shape"):
        with apply_mask(gpt2, resolve_sites(gpt2), mask):
            pass
    other = tiny_model("llama", seed=5)
    with pytest.raises(MaskMismatchError, match="fingerprint"):
        fold_into_weights(other, resolve_sites(other), mask, fingerprint=model_fingerprint(other))
    _, gmask = _random_mask(gpt2)
    with pytest.raises(MaskMismatchError):
        mask.union(gmask)
    with pytest.raises(MaskMismatchError, match="not a selprune mask"):
        NeuronMask.from_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")


def test_mask_hooks_removed_on_error(tiny_model):
    model = tiny_model("llama")
    sites, mask = _random_mask(model)
    with pytest.raises(RuntimeError), apply_mask(model, sites, mask):
        raise RuntimeError("boom")
    for module in sites.ff_modules + sites.attn_modules:
        assert not module._forward_pre_hooks


@torch.no_grad()
def test_hooks_act_only_in_the_registering_thread(tiny_model, tokenizer):
    """A job thread's mask and statistics hooks must not reach a serving thread's forwards."""
    model = tiny_model("llama")
    sites, mask = _random_mask(model)
    ids, attn = _batch(tokenizer, CORPUS[:2])
    plain = model(input_ids=ids, attention_mask=attn).logits
    cpu = torch.device("cpu")
    stats = ComponentStats.zeros(sites.n_layers, sites.d_mlp, ["sum_abs"], cpu)
    attn_stats = ComponentStats.zeros(sites.n_layers, sites.d_attn, ["sum_abs"], cpu)
    seen: dict[str, torch.Tensor] = {}

    def other_thread() -> None:
        with torch.no_grad():
            seen["logits"] = model(input_ids=ids, attention_mask=attn).logits

    with apply_mask(model, sites, mask), record_activations(sites, stats, attn_stats):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert torch.equal(seen["logits"], plain)
    assert stats.sum_abs is not None and float(stats.sum_abs.abs().sum()) == 0.0
