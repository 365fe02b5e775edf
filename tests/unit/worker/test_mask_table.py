from __future__ import annotations

import pytest
import torch

from selprune_core.errors import MaskMismatchError
from selprune_core.masking import apply_mask, apply_row_masks
from selprune_core.masks import NeuronMask
from selprune_core.sites import model_fingerprint, resolve_sites
from tests.helpers import random_mask
from worker.mask_table import MaskTable


@pytest.fixture
def model(tiny_model):
    return tiny_model("llama")


def _mask(model, seed: int) -> NeuronMask:
    return random_mask(model, seed)


def _offset_mask(model, seed: int) -> NeuronMask:
    """A mean-ablation mask: its pruned neurons output random constants."""
    mask = _mask(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    ff_offset = torch.randn(mask.ff_keep.shape, generator=g)  # [layer, d_mlp]
    attn_offset = torch.randn(mask.attn_keep.shape, generator=g)  # [layer, d_attn]
    return NeuronMask(mask.fingerprint, mask.ff_keep, mask.attn_keep, mask.n_heads, ff_offset, attn_offset)


def _table(model, capacity: int) -> MaskTable:
    return MaskTable(resolve_sites(model), model_fingerprint(model), torch.device("cpu"), capacity)


def test_factors_gather_each_rows_mask(model):
    table = _table(model, capacity=4)
    masks = [_mask(model, s) for s in range(3)]
    slots = [table.add(m) for m in masks]
    assert len(set(slots)) == 3 and 0 not in slots
    assert table.factors([0, 0], torch.float32) is None  # nobody masked: no hooks
    shared = table.factors([slots[1], slots[1]], torch.float32)
    assert shared is not None and torch.equal(shared.ff_keep, masks[1].ff_keep.float())  # [layer, d_mlp]
    assert shared.ff_offset is None and shared.attn_offset is None  # zero ablation: no addition
    mixed = table.factors([slots[2], 0, slots[0]], torch.bfloat16)
    assert mixed is not None and mixed.ff_keep.dtype == torch.bfloat16
    ff, attn = mixed.ff_keep, mixed.attn_keep  # [batch, layer, d]
    assert torch.equal(ff[0], masks[2].ff_keep.to(torch.bfloat16))
    assert bool(ff[1].all()) and bool(attn[1].all())  # slot 0 keeps everything
    assert torch.equal(attn[2], masks[0].attn_keep.to(torch.bfloat16))


def test_offsets_only_for_offset_rows_and_none_for_zero_only_batches(model):
    table = _table(model, capacity=4)
    zero, mean = _mask(model, 1), _offset_mask(model, 2)
    zero_slot = table.add(zero)
    small = table.nbytes
    mean_slot = table.add(mean)
    assert table.nbytes > small  # offset storage arrives with the first mean-ablation mask
    rows = table.factors([mean_slot, zero_slot, 0], torch.float32)
    assert rows is not None and rows.ff_offset is not None and rows.attn_offset is not None
    assert rows.ff_offset.shape == rows.ff_keep.shape  # [batch, layer, d_mlp]
    assert torch.equal(rows.ff_offset[0], mean.ff_offset) and torch.equal(
        rows.attn_offset[0], mean.attn_offset
    )
    assert not rows.ff_offset[1:].any() and not rows.attn_offset[1:].any()
    alone = table.factors([mean_slot], torch.float32)
    assert alone is not None and torch.equal(alone.ff_offset, mean.ff_offset)  # [layer, d_mlp]
    for slots in ([zero_slot], [zero_slot, 0, zero_slot]):
        only_zero = table.factors(slots, torch.float32)
        assert only_zero is not None and only_zero.ff_offset is None and only_zero.attn_offset is None


def test_a_reused_slot_does_not_keep_stale_offsets(model):
    table = _table(model, capacity=1)
    mean, zero = _offset_mask(model, 1), _mask(model, 2)
    slot = table.add(mean)
    assert table.add(zero) == slot and mean.mask_id not in table  # evicted, slot reused
    factors = table.factors([slot], torch.float32)
    assert factors is not None and torch.equal(factors.ff_keep, zero.ff_keep.float())
    assert factors.ff_offset is None and factors.attn_offset is None
    # Growth appends zero offsets too: a new slot's zero mask has no offsets either.
    grown = _table(model, capacity=16)
    grown.add(_offset_mask(model, 3))
    late = [grown.add(_mask(model, s)) for s in range(10, 20)]  # past the first 8 slots
    late_factors = grown.factors(late, torch.float32)
    assert max(late) > 8 and late_factors is not None and late_factors.ff_offset is None


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "opt"])  # opt hooks a flattened [batch * pos, d] MLP input
def test_rows_served_from_the_table_match_each_row_alone(tiny_model, arch):
    """The serving path: one forward over rows on different masks, each row as if it ran alone."""
    model = tiny_model(arch)
    sites = resolve_sites(model)
    table = _table(model, capacity=4)
    mean, zero = _offset_mask(model, 1), _mask(model, 2)
    rows = [mean, zero, None, mean]  # None: unmasked
    slots = [table.add(m) if m is not None else 0 for m in rows]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (len(rows), 10), generator=g)  # [batch, pos]
    factors = table.factors(slots, torch.float32)
    assert factors is not None and factors.ff_offset is not None
    with apply_row_masks(sites, factors):
        mixed = model(input_ids=ids).logits  # [batch, pos, vocab]
    for i, mask in enumerate(rows):
        if mask is None:
            alone = model(input_ids=ids[i : i + 1]).logits
        else:
            with apply_mask(model, sites, mask):
                alone = model(input_ids=ids[i : i + 1]).logits
        torch.testing.assert_close(mixed[i], alone[0], rtol=1e-5, atol=1e-5)
    # The offsets reached the batched row: the same bits zero-ablated give other logits.
    bits_only = NeuronMask(mean.fingerprint, mean.ff_keep, mean.attn_keep, mean.n_heads)
    with apply_mask(model, sites, bits_only):
        zeroed = model(input_ids=ids[:1]).logits
    assert (mixed[0] - zeroed[0]).abs().max() > 1e-3


def test_least_recently_used_mask_is_evicted_but_never_one_the_batch_holds(model):
    table = _table(model, capacity=2)
    a, b, c = (_mask(model, s) for s in range(3))
    table.add(a)
    table.add(b)
    table.slot(a.mask_id)  # a is now more recent than b
    table.add(c)
    assert a.mask_id in table and c.mask_id in table and b.mask_id not in table
    table.add(b, keep={a.mask_id})  # c is older than a, but only a is protected: c goes
    assert a.mask_id in table and b.mask_id in table and c.mask_id not in table
    with pytest.raises(RuntimeError, match="cannot hold"):
        table.add(c, keep={a.mask_id, b.mask_id})


def test_storage_grows_with_use_not_capacity(model):
    table = _table(model, capacity=100)
    small = table.nbytes
    for seed in range(20):
        table.add(_mask(model, seed))
    assert len(table) == 20
    assert table.nbytes > small
    sites = resolve_sites(model)
    per_mask = sites.n_layers * (sites.d_mlp + sites.d_attn)
    assert table.nbytes <= (1 + 32) * per_mask  # doubled from 8 to 16 to 32 slots, not 100


def test_same_mask_twice_takes_one_slot_and_foreign_masks_are_refused(model, tiny_model):
    table = _table(model, capacity=4)
    m = _mask(model, 0)
    assert table.add(m) == table.add(_mask(model, 0))
    assert len(table) == 1
    other = tiny_model("llama", seed=1)
    with pytest.raises(MaskMismatchError):
        table.add(_mask(other, 0))
