"""Neuron masks: the artifact selective pruning produces, and how a model runs through one.

A mask holds keep flags (True = neuron active) for every FF neuron [layer, d_mlp] and every attention
pre-out neuron [layer, n_heads * d_head] of one model, bound to that model's fingerprint. Its id is a
hash of the fingerprint, the shapes and the bits, so masks are content-addressed and immutable: equal
bits on the same model give the same id, and anything cached per mask can key on it.

Running through a mask multiplies the down- and output-projection inputs by the keep flags, which is
exactly zeroing those weight columns (output biases are kept); `fold_into_weights` does the latter for
export. `apply_mask` also takes one mask per batch row, which is how many masks share one model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save
from torch import nn

from selprune_core.errors import MaskMismatchError
from selprune_core.hooks import PreHook, scoped_pre_hooks
from selprune_core.sites import ModelSites

__all__ = ["NeuronMask", "apply_mask", "apply_row_masks", "fold_into_weights"]

_FORMAT = "selprune.neuron_mask.v1"


@dataclass(frozen=True, eq=False)
class NeuronMask:
    fingerprint: str  # model_fingerprint() of the model the mask belongs to
    ff_keep: torch.Tensor  # bool [layer, d_mlp]
    attn_keep: torch.Tensor  # bool [layer, n_heads * d_head]
    n_heads: int

    def __post_init__(self) -> None:
        assert self.ff_keep.dtype == torch.bool and self.attn_keep.dtype == torch.bool, (
            "keep flags must be bool"
        )
        assert self.ff_keep.dim() == 2 and self.attn_keep.dim() == 2, "keep flags must be [layer, width]"
        assert self.attn_keep.shape[1] % self.n_heads == 0, "attention width must be heads x head_dim"
        # Keep flags live on the CPU; callers move copies to their device.
        object.__setattr__(self, "ff_keep", self.ff_keep.detach().cpu().contiguous())
        object.__setattr__(self, "attn_keep", self.attn_keep.detach().cpu().contiguous())

    @classmethod
    def full(cls, sites: ModelSites, fingerprint: str) -> NeuronMask:
        """The mask that keeps everything."""
        return cls(
            fingerprint=fingerprint,
            ff_keep=torch.ones(sites.n_layers, sites.d_mlp, dtype=torch.bool),
            attn_keep=torch.ones(sites.n_layers, sites.d_attn, dtype=torch.bool),
            n_heads=sites.n_heads,
        )

    # Identity ----------------------------------------------------------------------------------
    def packed_bits(self) -> bytes:
        """FF bits then attention bits, row-major, packed 8 per byte (numpy big-endian bit order)."""
        flat = torch.cat([self.ff_keep.flatten(), self.attn_keep.flatten()]).numpy()
        return bytes(np.packbits(flat).tobytes())

    @property
    def mask_id(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{_FORMAT}|{self.fingerprint}|{self.shape_key}|".encode())
        digest.update(self.packed_bits())
        return digest.hexdigest()[:24]

    @property
    def shape_key(self) -> str:
        layers, d_mlp = self.ff_keep.shape
        return f"L{layers}.ff{d_mlp}.h{self.n_heads}x{self.attn_keep.shape[1] // self.n_heads}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NeuronMask) and other.mask_id == self.mask_id

    def __hash__(self) -> int:
        return hash(self.mask_id)

    # Counts ------------------------------------------------------------------------------------
    def pruned_counts(self) -> dict[str, Any]:
        ff_pruned = (~self.ff_keep).sum(dim=1)
        attn_pruned = (~self.attn_keep).sum(dim=1)
        return {
            "ff": int(ff_pruned.sum()),
            "attn": int(attn_pruned.sum()),
            "ff_total": self.ff_keep.numel(),
            "attn_total": self.attn_keep.numel(),
            "ff_per_layer": [int(c) for c in ff_pruned.tolist()],
            "attn_per_layer": [int(c) for c in attn_pruned.tolist()],
        }

    # Algebra -----------------------------------------------------------------------------------
    def _combine(
        self, other: NeuronMask, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> NeuronMask:
        if other.fingerprint != self.fingerprint or other.shape_key != self.shape_key:
            raise MaskMismatchError(
                f"masks belong to different models ({self.fingerprint}/{self.shape_key} vs "
                f"{other.fingerprint}/{other.shape_key})"
            )
        return NeuronMask(
            self.fingerprint,
            op(self.ff_keep, other.ff_keep),
            op(self.attn_keep, other.attn_keep),
            self.n_heads,
        )

    def union(self, other: NeuronMask) -> NeuronMask:
        """Prunes every neuron that either mask prunes."""
        return self._combine(other, torch.logical_and)

    def intersection(self, other: NeuronMask) -> NeuronMask:
        """Prunes only the neurons that both masks prune."""
        return self._combine(other, torch.logical_or)

    def check_fits(self, sites: ModelSites, fingerprint: str | None = None) -> None:
        """Raise MaskMismatchError unless this mask fits the model with these sites (and fingerprint)."""
        expected = (sites.n_layers, sites.d_mlp, sites.d_attn, sites.n_heads)
        actual = (self.ff_keep.shape[0], self.ff_keep.shape[1], self.attn_keep.shape[1], self.n_heads)
        if expected != actual:
            raise MaskMismatchError(
                f"mask {self.mask_id} has shape (layers, d_mlp, d_attn, heads)={actual}, model has {expected}"
            )
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise MaskMismatchError(
                f"mask {self.mask_id} was made for model fingerprint {self.fingerprint}, not {fingerprint}"
            )

    # Serialization -----------------------------------------------------------------------------
    def to_bytes(self, metadata: dict[str, Any] | None = None) -> bytes:
        """Safetensors bytes holding the keep flags packed 8 per byte; metadata goes in the header as JSON."""
        header = {
            "format": _FORMAT,
            "fingerprint": self.fingerprint,
            "n_heads": str(self.n_heads),
            "ff_shape": json.dumps(list(self.ff_keep.shape)),
            "attn_shape": json.dumps(list(self.attn_keep.shape)),
        }
        if metadata:
            header["meta"] = json.dumps(metadata, sort_keys=True)
        tensors = {"ff_keep": _pack(self.ff_keep), "attn_keep": _pack(self.attn_keep)}
        return bytes(save(tensors, metadata=header))

    @classmethod
    def from_bytes(cls, data: bytes) -> NeuronMask:
        header = _read_header(data)
        if header.get("format") != _FORMAT:
            raise MaskMismatchError(f"not a selprune mask file (format {header.get('format')!r})")
        tensors = load(data)
        return cls(
            fingerprint=header["fingerprint"],
            ff_keep=_unpack(tensors["ff_keep"], json.loads(header["ff_shape"])),
            attn_keep=_unpack(tensors["attn_keep"], json.loads(header["attn_shape"])),
            n_heads=int(header["n_heads"]),
        )

    def save(self, folder: Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write `<mask_id>.safetensors` and `<mask_id>.json` (metadata) into folder; returns the first."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.mask_id}.safetensors"
        path.write_bytes(self.to_bytes(metadata))
        meta = {
            "mask_id": self.mask_id,
            "fingerprint": self.fingerprint,
            **self.pruned_counts(),
            **(metadata or {}),
        }
        (folder / f"{self.mask_id}.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: Path) -> NeuronMask:
        return cls.from_bytes(Path(path).read_bytes())


def _pack(keep: torch.Tensor) -> torch.Tensor:
    # [layer, width] bool -> [ceil(layer * width / 8)] uint8, numpy big-endian bit order.
    return torch.from_numpy(np.packbits(keep.flatten().numpy()))


def _unpack(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    count = shape[0] * shape[1]
    bits = np.unpackbits(packed.numpy(), count=count)
    return torch.from_numpy(bits.astype(np.bool_)).view(shape[0], shape[1])


def _read_header(data: bytes) -> dict[str, str]:
    # Safetensors layout: 8-byte little-endian header length, then the JSON header.
    if len(data) < 8:
        raise MaskMismatchError("mask file is truncated")
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as exc:
        raise MaskMismatchError(f"mask file header is not valid JSON: {exc}") from exc
    meta = header.get("__metadata__", {})
    assert isinstance(meta, dict)
    return meta


def _stack_rows(
    masks: Sequence[NeuronMask], attr: str, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    # [batch, layer, width] keep flags in the activation dtype, ready to multiply.
    return torch.stack([getattr(m, attr) for m in masks]).to(device=device, dtype=dtype)


@contextlib.contextmanager
def apply_row_masks(sites: ModelSites, ff_rows: torch.Tensor, attn_rows: torch.Tensor) -> Iterator[None]:
    """Multiply hooked inputs by per-row keep factors for the duration of the block.

    `ff_rows` is [layer, d_mlp] (one mask for all rows) or [batch, layer, d_mlp] (one per row);
    `attn_rows` likewise with n_heads * d_head. The hooks act only in the calling thread (another thread
    may be serving through the same model) and are removed on exit, even on error.
    """

    def make_hook(rows: torch.Tensor, layer: int) -> PreHook:
        factor = rows[layer] if rows.dim() == 2 else rows[:, layer, None, :]  # [d] or [batch, 1, d]

        def mask_input(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = args[0]  # [batch, pos, d]; OPT flattens its MLP input to [batch * pos, d]
            if factor.dim() == 3 and x.dim() == 2:
                return ((x.view(factor.shape[0], -1, x.shape[-1]) * factor).view_as(x), *args[1:])
            return (x * factor, *args[1:])

        return mask_input

    hooks = [
        (module, make_hook(rows, layer))
        for rows, modules in ((ff_rows, sites.ff_modules), (attn_rows, sites.attn_modules))
        for layer, module in enumerate(modules)
    ]
    with scoped_pre_hooks(hooks):
        yield


@contextlib.contextmanager
def apply_mask(
    model: nn.Module,
    sites: ModelSites,
    mask: NeuronMask | Sequence[NeuronMask],
    *,
    fingerprint: str | None = None,
) -> Iterator[None]:
    """Run `model` through a mask, or through one mask per batch row when given a sequence.

    With a sequence, every forward inside the block must have exactly len(masks) rows.
    """
    masks = [mask] if isinstance(mask, NeuronMask) else list(mask)
    assert masks, "apply_mask needs at least one mask"
    for m in masks:
        m.check_fits(sites, fingerprint)
    param = next(model.parameters())
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    if isinstance(mask, NeuronMask):
        ff_rows = mask.ff_keep.to(device=param.device, dtype=dtype)
        attn_rows = mask.attn_keep.to(device=param.device, dtype=dtype)
    else:
        ff_rows = _stack_rows(masks, "ff_keep", param.device, dtype)
        attn_rows = _stack_rows(masks, "attn_keep", param.device, dtype)
    with apply_row_masks(sites, ff_rows, attn_rows):
        yield


@torch.no_grad()
def fold_into_weights(
    model: nn.Module, sites: ModelSites, mask: NeuronMask, *, fingerprint: str | None = None
) -> None:
    """Zero, in place, the down/out-projection weight columns of pruned neurons (biases are kept).

    The result computes exactly what `apply_mask` computes, without hooks: the export format.
    """
    mask.check_fits(sites, fingerprint)
    for layer in range(sites.n_layers):
        for (weight, axis), keep in (
            (sites.ff_weight_columns(layer), mask.ff_keep[layer]),
            (sites.attn_weight_columns(layer), mask.attn_keep[layer]),
        ):
            pruned = (~keep).nonzero().flatten().to(weight.device)
            weight.index_fill_(axis, pruned, 0.0)
