"""Where the neurons live: the hook sites of a loaded model, found from its structure (`site_search`).

A feed-forward neuron is one coordinate of the input of the MLP down projection (after the
nonlinearity, and after the gate product in gated MLPs). An attention "pre-out" neuron is one
coordinate of the input of the attention output projection: the head-major concatenation of the
per-head attention-weighted value sums, viewed as [heads, head_dim]. Hooking module *inputs* makes
parallel-residual models (NeoX) and grouped-query attention (Llama, SmolLM2, Mistral) need nothing
special, and taking widths from the modules handles heads x head_dim != hidden size (Gemma).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selprune_core.errors import UnsupportedArchitectureError
from selprune_core.placement import tensor_value
from selprune_core.site_search import ArchSpec, find_arch_spec, input_axis, text_config

__all__ = ["ArchSpec", "ModelSites", "resolve_sites", "model_fingerprint"]


@dataclass
class ModelSites:
    """The resolved hook modules of one loaded model, with the widths read off those modules."""

    model_type: str
    ff_modules: list[nn.Module]  # one per layer; input [batch, pos, d_mlp]
    attn_modules: list[nn.Module]  # one per layer; input [batch, pos, n_heads * d_head]
    d_mlp: int
    n_heads: int
    d_head: int
    spec: ArchSpec | None = None  # the module paths the sites came from
    config: Any = None  # the model's config (bias flags are set on it when export adds a bias)
    ff_blocks: list[nn.Module] | None = None  # the MLP holding each ff module
    attn_blocks: list[nn.Module] | None = None  # the attention block holding each attn module

    @property
    def n_layers(self) -> int:
        return len(self.ff_modules)

    @property
    def d_attn(self) -> int:
        return self.n_heads * self.d_head

    def ff_weight_columns(self, layer: int) -> tuple[torch.Tensor, int]:
        """The down-projection weight and the axis that indexes FF neurons (its input axis)."""
        return _input_axis(self.ff_modules[layer])

    def attn_weight_columns(self, layer: int) -> tuple[torch.Tensor, int]:
        """The output-projection weight and the axis that indexes pre-out neurons."""
        return _input_axis(self.attn_modules[layer])

    @torch.no_grad()
    def output_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """||W_out[:, n]|| for every FF and attention neuron: float64 [layer, d_mlp], [layer, d_attn].

        The norm of the weight column through which each neuron writes to the residual stream. Weights a
        device_map offloaded are read from their offloaded copy.
        """

        def norms(modules: list[nn.Module]) -> torch.Tensor:
            # The neuron axis is `axis`; the norm runs over the other (output) axis.
            columns = [(tensor_value(m, "weight"), _input_axis(m)[1]) for m in modules]
            return torch.stack([w.double().norm(dim=1 - axis).cpu() for w, axis in columns])

        return norms(self.ff_modules), norms(self.attn_modules)

    def output_bias(self, module: nn.Module, *, create: bool = False) -> torch.Tensor:
        """The bias of a hooked projection; with `create`, add one where there is none.

        Adding a bias sets the family's config flag so that a saved checkpoint reloads with it; the
        flag adds biases to every Linear of that block, so those get zero biases too (the function is
        unchanged). Raises UnsupportedArchitectureError when the family cannot hold such a bias.
        """
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            return bias
        if not create:
            raise UnsupportedArchitectureError(f"{type(module).__name__} has no bias")
        flag, blocks = self._bias_option(module)
        setattr(self.config, flag, True)
        for block in blocks:
            for child in block.modules():
                if isinstance(child, nn.Linear) and child.bias is None:
                    w = child.weight
                    child.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        new_bias = getattr(module, "bias", None)
        assert isinstance(new_bias, torch.Tensor), "bias creation failed"
        return new_bias

    def check_output_bias(self, module: nn.Module) -> None:
        """Raise UnsupportedArchitectureError unless `output_bias(module, create=True)` would succeed.

        Changes nothing, so a caller can check every projection before editing any of them.
        """
        if not isinstance(getattr(module, "bias", None), torch.Tensor):
            self._bias_option(module)

    def can_hold_bias(self, module: nn.Module) -> bool:
        """Whether a mean-ablation offset on this projection can be folded into a bias on export."""
        try:
            self.check_output_bias(module)
        except UnsupportedArchitectureError:
            return False
        return True

    def _bias_option(self, module: nn.Module) -> tuple[str, list[nn.Module]]:
        # The config flag that builds a bias on this projection, and the blocks it adds biases to.
        is_ff = any(module is m for m in self.ff_modules)
        flag = (self.spec.ff_bias_flag if is_ff else self.spec.attn_bias_flag) if self.spec else None
        blocks = self.ff_blocks if is_ff else self.attn_blocks
        if flag is None or blocks is None or self.config is None:
            part = "MLP down projection" if is_ff else "attention output projection"
            raise UnsupportedArchitectureError(
                f"model type {self.model_type!r} has no option for a bias on its {part}, so a mean-ablation "
                "mask cannot be folded into a checkpoint that transformers reloads; serve the mask through "
                "selprune, or prune with offset_mode 'zero'"
            )
        return flag, blocks


def _input_axis(module: nn.Module) -> tuple[torch.Tensor, int]:
    weight, axis = input_axis(module)
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__} has no weight tensor"
    return weight, axis


def _in_features(module: nn.Module) -> int:
    weight, axis = _input_axis(module)
    return int(weight.shape[axis])


def _get(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _parent(layer: nn.Module, path: str) -> nn.Module:
    return _get(layer, path.rpartition(".")[0]) if "." in path else layer


def _one_width(modules: list[nn.Module], what: str, prefix: str) -> int:
    # A mask is one [layer, d] tensor, so every layer must have the same width.
    widths = sorted({_in_features(m) for m in modules})
    if len(widths) != 1:
        raise UnsupportedArchitectureError(f"{prefix}: the {what} width differs across layers ({widths})")
    return widths[0]


def _check_widths(config: Any, d_mlp: int, d_attn: int, prefix: str) -> tuple[int, int]:
    """(n_heads, d_head), after checking the hooked widths against the config."""
    n_heads = getattr(config, "num_attention_heads", None)
    if not isinstance(n_heads, int) or n_heads <= 0 or d_attn % n_heads:
        raise UnsupportedArchitectureError(
            f"{prefix}: attention output width {d_attn} is not a multiple of num_attention_heads={n_heads}"
        )
    head_dim = getattr(config, "head_dim", None)
    if isinstance(head_dim, int) and n_heads * head_dim != d_attn:
        raise UnsupportedArchitectureError(
            f"{prefix}: attention output width {d_attn} != num_attention_heads x head_dim "
            f"({n_heads} x {head_dim})"
        )
    intermediate = getattr(config, "intermediate_size", None)
    if isinstance(intermediate, int) and intermediate != d_mlp:
        raise UnsupportedArchitectureError(
            f"{prefix}: MLP output projection reads {d_mlp} features, but intermediate_size is {intermediate}"
        )
    return n_heads, d_attn // n_heads


def resolve_sites(model: nn.Module) -> ModelSites:
    """Find the FF and attention hook modules of a Hugging Face transformer, from its structure.

    Decoder LMs and BERT-style encoders (bare or with a task head) alike: see `site_search`.

    Raises UnsupportedArchitectureError naming what was looked for and not found.
    """
    spec = find_arch_spec(model)
    config = text_config(model)
    model_type = str(getattr(config, "model_type", None))
    prefix = f"{type(model).__name__} (model_type={model_type!r})"
    layers = _get(model, spec.layers)
    assert isinstance(layers, nn.ModuleList), f"{spec.layers} is not a ModuleList"
    try:
        ff = [_get(layer, spec.ff_out) for layer in layers]
        attn = [_get(layer, spec.attn_out) for layer in layers]
    except AttributeError as exc:  # a later layer lacks what layer 0 has
        raise UnsupportedArchitectureError(f"{prefix}: not every layer of {spec.layers} has {exc}") from exc
    d_mlp = _one_width(ff, "MLP", prefix)
    n_heads, d_head = _check_widths(config, d_mlp, _one_width(attn, "attention", prefix), prefix)
    return ModelSites(
        model_type=model_type,
        ff_modules=ff,
        attn_modules=attn,
        d_mlp=d_mlp,
        n_heads=n_heads,
        d_head=d_head,
        spec=spec,
        config=config,
        ff_blocks=[_parent(layer, spec.ff_out) for layer in layers],
        attn_blocks=[_parent(layer, spec.attn_out) for layer in layers],
    )


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """A short, dtype-independent identity of a model's architecture and weights.

    Hashes the config's shape fields, every parameter's name and shape, and the signs of a sample of
    weight values. Signs survive any cast between fp32, fp16 and bf16 (rounded sums do not), so one
    checkpoint loaded in any dtype gets one fingerprint, while a fine-tune flips some small weights.
    Weights a device_map offloaded are read from their offloaded copy, so placement changes nothing.
    """
    sites = resolve_sites(model)
    digest = hashlib.sha256()
    header = {
        "model_type": sites.model_type,
        "n_layers": sites.n_layers,
        "d_mlp": sites.d_mlp,
        "n_heads": sites.n_heads,
        "d_head": sites.d_head,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    params = list(model.named_parameters())
    for name, param in params:
        digest.update(f"{name}:{tuple(param.shape)};".encode())
    # Sample a handful of tensors spread over the model, not all of them: this runs at load time.
    for name, param in params[:: max(1, len(params) // 8)]:
        owner, _, attr = name.rpartition(".")
        value = param if param.device.type != "meta" else tensor_value(model.get_submodule(owner), attr)
        sample = value.detach().flatten()[:4096].cpu()
        digest.update((sample > 0).numpy().tobytes())
        digest.update((sample < 0).numpy().tobytes())
    return digest.hexdigest()[:16]
