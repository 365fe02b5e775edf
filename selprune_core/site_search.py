"""Finding the hook sites of a causal LM from its module structure, not from a list of model types.

Most decoder LMs share one layout: a list of `num_hidden_layers` decoder layers, each holding an
attention block whose output projection reads the head-major concatenation of the heads, and an MLP
whose output projection reads the (gated) hidden activations. The names vary by family (`o_proj`,
`out_proj`, `dense`, `c_proj`; `down_proj`, `fc2`, `fc_out`, `dense_4h_to_h`), so the search tries
the common names in order and accepts a projection only when its output width is the hidden size.
`OVERRIDES` holds the few families where that rule picks wrongly or a config flag does not mean
what its name says. Mixture-of-experts layers are refused: see `_refuse_experts`.

BERT-style encoders (BERT, RoBERTa, and ViT before transformers 5) use the same two sites one module
deeper: the attention block's `output` holds the output projection (`attention.output.dense`), and
the FF layer is split into `intermediate` (up projection + activation) and `output` (`output.dense`).
So a candidate name may be a dotted path below the block; the nested names come last in each list,
so a layout the direct names already match picks exactly what it did before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from selprune_core.errors import UnsupportedArchitectureError

__all__ = ["ArchSpec", "OVERRIDES", "find_arch_spec", "input_axis", "text_config"]

# Names tried in order: the first (dotted) path below the block that exists, is a projection and
# writes `hidden` wins. "output.dense": the encoder layout (module docstring).
ATTN_BLOCK_NAMES = ("self_attn", "self_attention", "attn", "attention")
ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "output.dense")
MLP_BLOCK_NAMES = ("mlp", "feed_forward", "ffn")
FF_OUT_NAMES = ("down_proj", "fc2", "fc_out", "dense_4h_to_h", "c_proj", "w2", "wo", "output.dense")
# Config fields that name a mixture of experts; a positive count means routed FF layers.
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one model, relative to the model and to one (decoder or encoder) layer."""

    layers: str  # dotted path of the layer list
    ff_out: str  # MLP output projection, relative to a layer; its input holds the FF neurons
    attn_out: str  # attention output projection, relative to a layer; its input holds pre-out neurons
    # Config flags that make transformers build biases on every Linear of the MLP / attention block
    # (needed to export a mean-ablation mask where the projection has no bias); None: no such option.
    ff_bias_flag: str | None = None
    attn_bias_flag: str | None = None


# Keyed by config.model_type: fields where the structural rule is wrong for that family.
OVERRIDES: dict[str, dict[str, Any]] = {
    # Falcon's one `bias` flag adds biases to every Linear of the model at once, so it cannot give a
    # bias to one projection without changing the rest; its mean-ablation masks are served, not exported.
    "falcon": {"ff_bias_flag": None, "attn_bias_flag": None},
}


def text_config(model: nn.Module) -> Any:
    """The config describing the language model (the text half of a multimodal config)."""
    config: Any = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def input_axis(module: nn.Module) -> tuple[Any, int]:
    """A projection's weight and the axis that indexes its inputs: nn.Linear is [out, in], Conv1D [in, out]."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return weight, 1
    if isinstance(module, Conv1D):
        return weight, 0
    raise UnsupportedArchitectureError(f"{type(module).__name__} is neither nn.Linear nor Conv1D")


def _out_width(module: nn.Module) -> int | None:
    if not isinstance(module, (nn.Linear, Conv1D)):
        return None
    weight, axis = input_axis(module)
    return int(weight.shape[1 - axis])


def _child(parent: nn.Module, name: str) -> nn.Module | None:
    child = getattr(parent, name, None) if name in dict(parent.named_children()) else None
    return child if isinstance(child, nn.Module) else None


def _descendant(block: nn.Module, dotted: str) -> nn.Module | None:
    """The submodule at a dotted path of child names below `block`, or None where a step is missing."""
    module: nn.Module | None = block
    for name in dotted.split("."):
        module = _child(module, name) if module is not None else None
    return module


def _projection(block: nn.Module, names: tuple[str, ...], hidden: int) -> str | None:
    """The first of `names` that is a projection below `block` (child, or dotted path) writing `hidden`."""
    for name in names:
        child = _descendant(block, name)
        if child is not None and _out_width(child) == hidden:
            return name
    return None


def _block(layer: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if _child(layer, name) is not None), None)


def _refuse_experts(model: nn.Module, config: Any, where: str) -> None:
    """Refuse mixture-of-experts models: an FF neuron there belongs to one expert, sees only the
    tokens routed to it, and in transformers 5 lives in a fused [experts, ...] tensor with no per-expert
    projection to hook. Scoring needs per-expert token counts and masks need an expert axis; until both
    exist, a clear refusal beats statistics that average over tokens a neuron never saw."""
    counts = {f: getattr(config, f, None) for f in EXPERT_COUNT_FIELDS}
    experts = {f: n for f, n in counts.items() if isinstance(n, int) and n > 0}
    routed = [
        name for name, _ in model.named_modules() if name.startswith(where) and name.endswith("experts")
    ]
    if experts or routed:
        found = ", ".join([f"{f}={n}" for f, n in experts.items()] + routed[:2])
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is a mixture-of-experts model ({found}); selprune does not prune "
            "expert FF layers: each expert's neurons see only the tokens routed to it, so their statistics "
            "need per-expert token counts and their masks an expert axis, which selprune does not have yet"
        )


def _find_layers(model: nn.Module, n_layers: int) -> list[tuple[str, nn.ModuleList]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name
    ]


def _layer_spec(layer: nn.Module, hidden: int) -> tuple[str | None, str | None]:
    """(ff_out, attn_out) paths relative to one layer; None where nothing matched."""
    attn_block = _block(layer, ATTN_BLOCK_NAMES)
    attn_out = None
    if attn_block is not None:
        name = _projection(getattr(layer, attn_block), ATTN_OUT_NAMES, hidden)
        attn_out = f"{attn_block}.{name}" if name else None
    mlp_block = _block(layer, MLP_BLOCK_NAMES)
    # Without an MLP submodule (OPT), the layer holds the MLP projections itself; in the encoder
    # layout it holds `intermediate` and `output`, and "output.dense" is found from the layer.
    mlp = getattr(layer, mlp_block) if mlp_block is not None else layer
    name = _projection(mlp, FF_OUT_NAMES, hidden)
    ff_out = (f"{mlp_block}.{name}" if mlp_block else name) if name else None
    return ff_out, attn_out


def find_arch_spec(model: nn.Module) -> ArchSpec:
    """The hook-site paths of `model`, found from its structure (then `OVERRIDES` applied).

    Raises UnsupportedArchitectureError naming what was looked for and not found.
    """
    config = text_config(model)
    model_type = str(getattr(config, "model_type", None))
    n_layers = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    prefix = f"{type(model).__name__} (model_type={model_type!r})"
    if not isinstance(n_layers, int) or not isinstance(hidden, int):
        raise UnsupportedArchitectureError(
            f"{prefix}: its config has no integer num_hidden_layers and hidden_size, which selprune needs "
            "to find the decoder layers"
        )
    candidates = _find_layers(model, n_layers)
    if not candidates:
        raise UnsupportedArchitectureError(
            f"{prefix}: found no nn.ModuleList of {n_layers} decoder layers (num_hidden_layers)"
        )
    misses = []
    for path, layers in candidates:
        _refuse_experts(model, config, path)
        ff_out, attn_out = _layer_spec(layers[0], hidden)
        if ff_out and attn_out:
            spec = ArchSpec(
                layers=path,
                ff_out=ff_out,
                attn_out=attn_out,
                ff_bias_flag="mlp_bias" if hasattr(config, "mlp_bias") else None,
                attn_bias_flag="attention_bias" if hasattr(config, "attention_bias") else None,
            )
            return dataclasses.replace(spec, **OVERRIDES.get(model_type, {}))
        misses.append((path, ff_out, attn_out))
    path, ff_out, attn_out = misses[0]
    looked = []
    if attn_out is None:
        looked.append(
            f"an attention block ({', '.join(ATTN_BLOCK_NAMES)}) with an output projection "
            f"({', '.join(ATTN_OUT_NAMES)}) writing {hidden} features"
        )
    if ff_out is None:
        looked.append(
            f"an MLP ({', '.join(MLP_BLOCK_NAMES)}, or the layer itself) with an output projection "
            f"({', '.join(FF_OUT_NAMES)}) writing {hidden} features"
        )
    raise UnsupportedArchitectureError(
        f"{prefix} does not have the common decoder layout: in {path}.0 selprune looked for "
        f"{'; and for '.join(looked)}, as nn.Linear or Conv1D, and found none"
    )
