"""MaskTable: the keep flags of recently used masks of one model, resident on the model's device.

Serving many masks from one model copy comes down to this table. Each mask occupies one slot of two
bool tensors ([slots, layer, d_mlp] and [slots, layer, n_heads * d_head]); slot 0 keeps every neuron
and serves unmasked rows. Mean-ablation masks also fill two float32 offset tensors of the same
shapes, which the table allocates only once the first such mask arrives, so zero-ablation serving
pays nothing for them. A batch's per-row keep factors are one index_select over the table, so a
batch on eight masks costs what a batch on one does. Masks are content-addressed, so a slot keyed by
mask id never goes stale; the least recently used one is evicted when the table is full. Storage
grows by doubling, so a worker serving a handful of masks does not pay for `capacity` of them.

The table lives on the model's input device (`LoadedModel.device`). On a model a device_map spreads
over several devices, each layer's hook moves that layer's rows of the factors to the layer's own
device once per batch composition (`MaskFactors.layer`), not once per decode step.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection, Sequence

import torch

from selprune_core.masking import MaskFactors
from selprune_core.masks import NeuronMask
from selprune_core.sites import ModelSites

log = logging.getLogger(__name__)

_INITIAL_SLOTS = 8


class MaskTable:
    def __init__(self, sites: ModelSites, fingerprint: str, device: torch.device, capacity: int) -> None:
        assert capacity >= 1, f"capacity must be >= 1, got {capacity}"
        self.sites = sites
        self.fingerprint = fingerprint
        self.device = device
        self.capacity = capacity  # masks held, not counting the full mask in slot 0
        self._ids: OrderedDict[str, int] = OrderedDict()  # mask id -> slot, least recently used first
        self._free: list[int] = []
        self._ff = torch.ones(
            1, sites.n_layers, sites.d_mlp, dtype=torch.bool, device=device
        )  # [slot, L, d_mlp]
        self._attn = torch.ones(
            1, sites.n_layers, sites.d_attn, dtype=torch.bool, device=device
        )  # [slot, L, d_attn]
        # Offsets of pruned neurons, float32 [slot, L, d]; None until a mean-ablation mask is added.
        self._ff_offset: torch.Tensor | None = None
        self._attn_offset: torch.Tensor | None = None
        self._grow(min(_INITIAL_SLOTS, capacity))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, mask_id: object) -> bool:
        return mask_id in self._ids

    @property
    def nbytes(self) -> int:
        """Device bytes the table holds (every slot, used or free)."""
        offsets = [t for t in (self._ff_offset, self._attn_offset) if t is not None]
        return self._ff.numel() + self._attn.numel() + sum(t.numel() * t.element_size() for t in offsets)

    def slot(self, mask_id: str) -> int | None:
        """The mask's slot, marking it recently used; None if the table does not hold it."""
        slot = self._ids.get(mask_id)
        if slot is not None:
            self._ids.move_to_end(mask_id)
        return slot

    def add(self, mask: NeuronMask, *, keep: Collection[str] = ()) -> int:
        """Store `mask` (checked against the model) and return its slot.

        When the table is full the least recently used mask not in `keep` (the masks the batch being
        assembled already uses) is evicted; MaskMismatchError if the mask was made on another model.
        """
        mask.check_fits(self.sites, self.fingerprint)
        mask_id = mask.mask_id
        known = self.slot(mask_id)
        if known is not None:
            return known
        if not self._free:
            if self._slots_used() < self.capacity:
                self._grow(min(2 * self._slots_used(), self.capacity))
            else:
                self._evict(keep)
        slot = self._free.pop()
        self._ff[slot] = mask.ff_keep.to(self.device)
        self._attn[slot] = mask.attn_keep.to(self.device)
        if mask.has_offsets and self._ff_offset is None:
            self._ff_offset = torch.zeros(self._ff.shape, dtype=torch.float32, device=self.device)
            self._attn_offset = torch.zeros(self._attn.shape, dtype=torch.float32, device=self.device)
        if self._ff_offset is not None and self._attn_offset is not None:  # a freed slot may hold old offsets
            ff_offset, attn_offset = mask.offsets_or_zeros()
            self._ff_offset[slot] = ff_offset.to(self.device)
            self._attn_offset[slot] = attn_offset.to(self.device)
        self._ids[mask_id] = slot
        return slot

    def factors(self, slots: Sequence[int], dtype: torch.dtype) -> MaskFactors | None:
        """Keep factors (and offsets) for rows served from `slots`, in the activation dtype.

        None when no row is masked (the caller skips the hooks altogether); [layer, d] when every row
        shares one mask; else [batch, layer, d], one mask per row. Offsets are None unless some row's
        mask has them.
        """
        if all(s == 0 for s in slots):
            return None
        shared = len(set(slots)) == 1
        index = torch.tensor(list(slots[:1] if shared else slots), device=self.device)  # [batch] or [1]

        def gather(table: torch.Tensor | None) -> torch.Tensor | None:
            if table is None:
                return None
            rows = table.index_select(0, index).to(dtype)  # [batch, layer, d]
            return rows[0] if shared else rows

        ff, attn = gather(self._ff), gather(self._attn)
        assert ff is not None and attn is not None
        ff_offset, attn_offset = gather(self._ff_offset), gather(self._attn_offset)
        if ff_offset is not None and attn_offset is not None and not (ff_offset.any() or attn_offset.any()):
            ff_offset = attn_offset = None  # these rows are all zero-ablated: skip the addition
        return MaskFactors(ff, attn, ff_offset, attn_offset)

    # Storage ---------------------------------------------------------------------------------------
    def _slots_used(self) -> int:
        return self._ff.shape[0] - 1  # slot 0 is the full mask

    def _grow(self, slots: int) -> None:
        old = self._slots_used()
        extra = slots - old
        if extra <= 0:
            return
        shape_ff, shape_attn = (extra, *self._ff.shape[1:]), (extra, *self._attn.shape[1:])
        self._ff = torch.cat([self._ff, torch.ones(shape_ff, dtype=torch.bool, device=self.device)])
        self._attn = torch.cat([self._attn, torch.ones(shape_attn, dtype=torch.bool, device=self.device)])
        if self._ff_offset is not None and self._attn_offset is not None:
            self._ff_offset = torch.cat([self._ff_offset, torch.zeros(shape_ff, device=self.device)])
            self._attn_offset = torch.cat([self._attn_offset, torch.zeros(shape_attn, device=self.device)])
        self._free.extend(range(slots, old, -1))  # pop() hands out the lowest new slot first

    def _evict(self, keep: Collection[str]) -> None:
        for mask_id in self._ids:
            if mask_id not in keep:
                slot = self._ids.pop(mask_id)
                self._free.append(slot)
                log.debug("mask table: evicted %s from slot %d", mask_id, slot)
                return
        raise RuntimeError(
            f"mask table of {self.capacity} slots cannot hold one batch's {len(keep) + 1} masks"
        )
