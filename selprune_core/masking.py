"""Running a model through neuron masks: forward pre-hooks for serving and evaluation, and folding a
mask into the weights for export.

Running through a mask replaces each down- and output-projection input x by x * keep + offset (offset
is 0 on kept neurons). Zero ablation is exactly zeroing those weight columns; an offset adds the
constant W[:, pruned] @ offset[pruned] to the projection's output, which is a bias. `fold_into_weights`
does both for export. `apply_mask` also takes one mask per batch row, which is how many masks share
one model.

On a model spread over devices by a device_map, each hook uses its layer's factors on the device its
input arrives on (moved once per factors object and device, then reused), and folding works on each
projection's own device; folding refuses weights that the map offloaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from selprune_core.hooks import PreHook, scoped_pre_hooks
from selprune_core.masks import NeuronMask
from selprune_core.placement import check_weights_resident, input_device
from selprune_core.sites import ModelSites

__all__ = ["MaskFactors", "apply_mask", "apply_row_masks", "fold_into_weights"]


@dataclass(frozen=True)
class MaskFactors:
    """What the hooks multiply and add: x -> x * keep + offset, in the activation dtype.

    Each tensor is [layer, d] (one mask for every row) or [batch, layer, d] (one mask per row). Offsets
    are 0 on kept neurons; None means every row is zero-ablated, and the hooks skip the addition.
    """

    ff_keep: torch.Tensor
    attn_keep: torch.Tensor
    ff_offset: torch.Tensor | None = None
    attn_offset: torch.Tensor | None = None
    # (component, layer, device) -> that layer's (keep, offset) on that device; filled by `layer`.
    _placed: dict[tuple[str, int, torch.device], tuple[torch.Tensor, torch.Tensor | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def layer(
        self, component: str, layer: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer's keep and offset factors ("ff" or "attn") on `device`: [d], or [batch, 1, d] per row.

        Moved to a device once per factors object (the serving lane reuses one over many decode steps).
        """
        key = (component, layer, device)
        placed = self._placed.get(key)
        if placed is None:
            keep_rows, offset_rows = (
                (self.ff_keep, self.ff_offset) if component == "ff" else (self.attn_keep, self.attn_offset)
            )
            keep, offset = _layer_factor(keep_rows, layer), _layer_factor(offset_rows, layer)
            assert keep is not None
            placed = (keep.to(device), None if offset is None else offset.to(device))
            self._placed[key] = placed
        return placed

    @classmethod
    def of(cls, masks: Sequence[NeuronMask], device: torch.device, dtype: torch.dtype) -> MaskFactors:
        """Factors of one mask ([layer, d]) or of one mask per row ([batch, layer, d])."""

        def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
            out = tensors[0] if len(tensors) == 1 else torch.stack(tensors)
            return out.to(device=device, dtype=dtype)

        offsets = [m.offsets_or_zeros() for m in masks] if any(m.has_offsets for m in masks) else None
        return cls(
            ff_keep=stack([m.ff_keep for m in masks]),
            attn_keep=stack([m.attn_keep for m in masks]),
            ff_offset=stack([o[0] for o in offsets]) if offsets else None,
            attn_offset=stack([o[1] for o in offsets]) if offsets else None,
        )


def _layer_factor(rows: torch.Tensor | None, layer: int) -> torch.Tensor | None:
    # [layer, d] -> [d]; [batch, layer, d] -> [batch, 1, d], broadcasting over positions.
    if rows is None:
        return None
    return rows[layer] if rows.dim() == 2 else rows[:, layer, None, :]


@contextlib.contextmanager
def apply_row_masks(sites: ModelSites, factors: MaskFactors) -> Iterator[None]:
    """Replace hooked inputs x by x * keep + offset for the duration of the block.

    The hooks act only in the calling thread (another thread may be serving through the same model)
    and are removed on exit, even on error.
    """

    def make_hook(component: str, layer: int) -> PreHook:
        def mask_input(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = args[0]  # [batch, pos, d]; OPT flattens its MLP input to [batch * pos, d]
            keep, offset = factors.layer(component, layer, x.device)
            flat = keep.dim() == 3 and x.dim() == 2
            view = x.view(keep.shape[0], -1, x.shape[-1]) if flat else x
            out = view * keep if offset is None else torch.addcmul(offset, view, keep)
            return (out.view_as(x) if flat else out, *args[1:])

        return mask_input

    hooks = [
        (module, make_hook(component, layer))
        for component, modules in (("ff", sites.ff_modules), ("attn", sites.attn_modules))
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
    with apply_row_masks(sites, MaskFactors.of(masks, input_device(model), dtype)):
        yield


@torch.no_grad()
def fold_into_weights(
    model: nn.Module, sites: ModelSites, mask: NeuronMask, *, fingerprint: str | None = None
) -> None:
    """Fold the mask into the weights in place, so the model computes what `apply_mask` computes.

    Pruned neurons' down/out-projection weight columns are zeroed. A mean-ablation mask's offsets
    become the constant W[:, pruned] @ offset[pruned] added to the projection's bias; where the
    projection has no bias, `sites.output_bias(module, create=True)` gives it one (and sets the config
    flag that makes transformers build it on reload). Raises UnsupportedArchitectureError, before
    changing anything, when the family cannot hold such a bias, and ConfigError when a device_map
    offloaded weights (they are not in memory to change).
    """
    mask.check_fits(sites, fingerprint)
    check_weights_resident(model, "folding a mask into the weights")
    ff_offset, attn_offset = mask.offsets_or_zeros()
    # Check every projection first: failing halfway would leave a half-pruned model behind.
    for modules, offsets in ((sites.ff_modules, ff_offset), (sites.attn_modules, attn_offset)):
        for module, offset in zip(modules, offsets, strict=True):
            if offset.any():
                sites.check_output_bias(module)
    for layer in range(sites.n_layers):
        for module, (weight, axis), keep, offset in (
            (sites.ff_modules[layer], sites.ff_weight_columns(layer), mask.ff_keep[layer], ff_offset[layer]),
            (
                sites.attn_modules[layer],
                sites.attn_weight_columns(layer),
                mask.attn_keep[layer],
                attn_offset[layer],
            ),
        ):
            if offset.any():
                # Linear: [out, in] @ [in]; Conv1D: [in] @ [in, out]. Computed in fp32, before zeroing.
                vec = offset.to(device=weight.device, dtype=torch.float32)
                w = weight.float()
                shift = w @ vec if axis == 1 else vec @ w  # [out]
                bias = sites.output_bias(module, create=True)
                bias.add_(shift.to(bias.dtype))
            pruned = (~keep).nonzero().flatten().to(weight.device)
            weight.index_fill_(axis, pruned, 0.0)
