"""Neuron masks: the artifact selective pruning produces, and its file format.

A mask holds keep flags (True = neuron active) for every FF neuron [layer, d_mlp] and every attention
pre-out neuron [layer, n_heads * d_head] of one model, bound to that model's fingerprint. A mask may
also hold *offsets*: the value each pruned neuron outputs instead of 0 (mean ablation: its mean
activation on the retain data). Its id is a hash of the fingerprint, the shapes, the bits and the
offsets, so masks are content-addressed and immutable: equal content on the same model gives the same
id, and anything cached per mask can key on it. A mask without offsets hashes exactly as before
offsets existed, so older ids stay valid.

Running a model through a mask is selprune_core/masking.py's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save

from selprune_core.errors import MaskMismatchError
from selprune_core.sites import ModelSites

__all__ = ["NeuronMask"]

_FORMAT = "selprune.neuron_mask.v1"


@dataclass(frozen=True, eq=False)
class NeuronMask:
    fingerprint: str  # model_fingerprint() of the model the mask belongs to
    ff_keep: torch.Tensor  # bool [layer, d_mlp]
    attn_keep: torch.Tensor  # bool [layer, n_heads * d_head]
    n_heads: int
    # Value a pruned neuron outputs (float32, same shape as the keep flags, 0 on kept neurons); None
    # means zero ablation. Offsets are stored only where some neuron is pruned.
    ff_offset: torch.Tensor | None = None
    attn_offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        assert self.ff_keep.dtype == torch.bool and self.attn_keep.dtype == torch.bool, (
            "keep flags must be bool"
        )
        assert self.ff_keep.dim() == 2 and self.attn_keep.dim() == 2, "keep flags must be [layer, width]"
        assert self.attn_keep.shape[1] % self.n_heads == 0, "attention width must be heads x head_dim"
        # Keep flags live on the CPU; callers move copies to their device.
        object.__setattr__(self, "ff_keep", self.ff_keep.detach().cpu().contiguous())
        object.__setattr__(self, "attn_keep", self.attn_keep.detach().cpu().contiguous())
        for name, keep in (("ff_offset", self.ff_keep), ("attn_offset", self.attn_keep)):
            offset = getattr(self, name)
            if offset is None:
                continue
            assert offset.shape == keep.shape, f"{name} {tuple(offset.shape)} != keep {tuple(keep.shape)}"
            # Offsets of kept neurons are meaningless: zero them so they never change the id.
            # + 0.0 turns -0.0 into 0.0: both compute the same, so they must hash the same.
            clean = offset.detach().to(device="cpu", dtype=torch.float32).masked_fill(keep, 0.0) + 0.0
            if not torch.isfinite(clean).all():
                raise MaskMismatchError(f"{name} holds NaN or infinite values")
            object.__setattr__(self, name, None if not clean.any() else clean.contiguous())

    @classmethod
    def full(cls, sites: ModelSites, fingerprint: str) -> NeuronMask:
        """The mask that keeps everything."""
        return cls(
            fingerprint=fingerprint,
            ff_keep=torch.ones(sites.n_layers, sites.d_mlp, dtype=torch.bool),
            attn_keep=torch.ones(sites.n_layers, sites.d_attn, dtype=torch.bool),
            n_heads=sites.n_heads,
        )

    @property
    def has_offsets(self) -> bool:
        """True for a mean-ablation mask: some pruned neuron outputs a nonzero constant."""
        return self.ff_offset is not None or self.attn_offset is not None

    def offsets_or_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ff, attn) offsets as dense float32 tensors, zeros where the mask has none."""
        ff = self.ff_offset if self.ff_offset is not None else torch.zeros(self.ff_keep.shape)
        attn = self.attn_offset if self.attn_offset is not None else torch.zeros(self.attn_keep.shape)
        return ff, attn

    def prune(
        self,
        ff_chosen: torch.Tensor,
        attn_chosen: torch.Tensor,
        *,
        ff_values: torch.Tensor | None = None,
        attn_values: torch.Tensor | None = None,
    ) -> NeuronMask:
        """This mask with the chosen neurons (bool [layer, width]) pruned as well.

        Newly pruned neurons output `*_values` at their positions (dense [layer, width]), or 0 when
        None; neurons this mask already prunes keep their offsets.
        """
        # Selections may live on the model's device; the mask lives on the CPU.
        ff_chosen, attn_chosen = ff_chosen.cpu(), attn_chosen.cpu()
        ff_offset, attn_offset = self.offsets_or_zeros()
        if ff_values is not None:
            ff_offset = torch.where(ff_chosen & self.ff_keep, ff_values.float().cpu(), ff_offset)
        if attn_values is not None:
            attn_offset = torch.where(attn_chosen & self.attn_keep, attn_values.float().cpu(), attn_offset)
        return NeuronMask(
            self.fingerprint,
            self.ff_keep & ~ff_chosen,
            self.attn_keep & ~attn_chosen,
            self.n_heads,
            ff_offset,
            attn_offset,
        )

    # Identity ----------------------------------------------------------------------------------
    def packed_bits(self) -> bytes:
        """FF bits then attention bits, row-major, packed 8 per byte (numpy big-endian bit order)."""
        flat = torch.cat([self.ff_keep.flatten(), self.attn_keep.flatten()]).numpy()
        return bytes(np.packbits(flat).tobytes())

    def _pruned_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The offsets of pruned neurons only, row-major: what the file stores and the id covers.
        ff, attn = self.offsets_or_zeros()
        return ff[~self.ff_keep].contiguous(), attn[~self.attn_keep].contiguous()

    @property
    def mask_id(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{_FORMAT}|{self.fingerprint}|{self.shape_key}|".encode())
        digest.update(self.packed_bits())
        if self.has_offsets:  # zero-ablation masks keep the ids they had before offsets existed
            ff, attn = self._pruned_offsets()
            digest.update(b"|offsets|")
            digest.update(ff.numpy().astype("<f4").tobytes())
            digest.update(attn.numpy().astype("<f4").tobytes())
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
        # A neuron pruned by this mask keeps this mask's offset, else it takes the other's.
        mine, theirs = self.offsets_or_zeros(), other.offsets_or_zeros()
        ff_offset = torch.where(self.ff_keep, theirs[0], mine[0])
        attn_offset = torch.where(self.attn_keep, theirs[1], mine[1])
        return NeuronMask(
            self.fingerprint,
            op(self.ff_keep, other.ff_keep),
            op(self.attn_keep, other.attn_keep),
            self.n_heads,
            ff_offset,
            attn_offset,
        )

    def union(self, other: NeuronMask) -> NeuronMask:
        """Prunes every neuron that either mask prunes (offsets: this mask's first)."""
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
        if self.has_offsets:
            # Only pruned neurons' offsets, in row-major order of the pruned positions: a few kB.
            tensors["ff_offset"], tensors["attn_offset"] = self._pruned_offsets()
        return bytes(save(tensors, metadata=header))

    @classmethod
    def from_bytes(cls, data: bytes) -> NeuronMask:
        header = _read_header(data)
        if header.get("format") != _FORMAT:
            raise MaskMismatchError(f"not a selprune mask file (format {header.get('format')!r})")
        tensors = load(data)
        ff_keep = _unpack(tensors["ff_keep"], json.loads(header["ff_shape"]))
        attn_keep = _unpack(tensors["attn_keep"], json.loads(header["attn_shape"]))
        return cls(
            fingerprint=header["fingerprint"],
            ff_keep=ff_keep,
            attn_keep=attn_keep,
            n_heads=int(header["n_heads"]),
            ff_offset=_scatter_offsets(tensors.get("ff_offset"), ff_keep),
            attn_offset=_scatter_offsets(tensors.get("attn_offset"), attn_keep),
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


def _scatter_offsets(values: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    # Stored offsets are the pruned positions' values in row-major order; rebuild the dense tensor.
    if values is None:
        return None
    if values.numel() != int((~keep).sum()):
        raise MaskMismatchError(
            f"mask file has {values.numel()} offsets for {int((~keep).sum())} pruned neurons"
        )
    dense = torch.zeros(keep.shape, dtype=torch.float32)
    dense[~keep] = values.float()
    return dense


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
