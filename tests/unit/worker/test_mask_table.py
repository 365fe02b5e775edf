from __future__ import annotations

import pytest
import torch

from selprune_core.errors import MaskMismatchError
from selprune_core.masks import NeuronMask
from selprune_core.sites import model_fingerprint, resolve_sites
from worker.mask_table import MaskTable


@pytest.fixture
def model(tiny_model):
    return tiny_model("llama")


def _mask(model, seed: int) -> NeuronMask:
    sites = resolve_sites(model)
    g = torch.Generator().manual_seed(seed)
    ff = torch.rand(sites.n_layers, sites.d_mlp, generator=g) > 0.3
    attn = torch.rand(sites.n_layers, sites.d_attn, generator=g) > 0.3
    return NeuronMask(model_fingerprint(model), ff, attn, sites.n_heads)


def _table(model, capacity: int) -> MaskTable:
    return MaskTable(resolve_sites(model), model_fingerprint(model), torch.device("cpu"), capacity)


def test_factors_gather_each_rows_mask(model):
    table = _table(model, capacity=4)
    masks = [_mask(model, s) for s in range(3)]
    slots = [table.add(m) for m in masks]
    assert len(set(slots)) == 3 and 0 not in slots
    assert table.factors([0, 0], torch.float32) is None  # nobody masked: no hooks
    shared = table.factors([slots[1], slots[1]], torch.float32)
    assert shared is not None and torch.equal(shared[0], masks[1].ff_keep.float())  # [layer, d_mlp]
    ff, attn = table.factors([slots[2], 0, slots[0]], torch.bfloat16) or (None, None)
    assert ff is not None and attn is not None and ff.dtype == torch.bfloat16
    assert torch.equal(ff[0], masks[2].ff_keep.to(torch.bfloat16))
    assert bool(ff[1].all()) and bool(attn[1].all())  # slot 0 keeps everything
    assert torch.equal(attn[2], masks[0].attn_keep.to(torch.bfloat16))


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
