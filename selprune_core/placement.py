"""A model spread over devices by a device_map: where its inputs go, where a module computes, and the
values of weights that are offloaded.

`from_pretrained(device_map=...)` gives every placed module an accelerate hook (`module._hf_hook`) that
moves the module's inputs to its *execution device*. A module offloaded to CPU memory or disk keeps its
parameters on the `meta` device between forwards and has them loaded onto the execution device for the
length of its own forward, from a weights map its hook holds. So on such a model
`next(model.parameters()).device` may be `meta`; the functions here ask the hooks instead, and are
plain lookups on a model loaded onto one device.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from selprune_core.errors import ConfigError

__all__ = [
    "check_weights_resident",
    "execution_device",
    "input_device",
    "offloaded_parameters",
    "tensor_value",
]


def _hooks(module: nn.Module) -> list[Any]:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several


def execution_device(module: nn.Module) -> torch.device | None:
    """Where `module` computes: its hook's execution device, else the device of its first parameter
    or buffer that is not on `meta`; None when neither tells."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return None


def input_device(model: nn.Module) -> torch.device:
    """The device token ids go to: the input embedding's execution device."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    for module in (embeddings, model):
        if isinstance(module, nn.Module) and (device := execution_device(module)) is not None:
            return device
    return torch.device("cpu")


def offloaded_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters a device_map offloaded (on `meta` between forwards)."""
    return [name for name, param in model.named_parameters() if param.device.type == "meta"]


def tensor_value(module: nn.Module, name: str) -> torch.Tensor:
    """The value of `module`'s own parameter or buffer `name`: the tensor itself, or, when offloaded,
    its copy in the hook's weights map (CPU memory or a memory-mapped file; read, never written)."""
    tensor = getattr(module, name)
    assert isinstance(tensor, torch.Tensor), f"{type(module).__name__}.{name} is not a tensor"
    if tensor.device.type != "meta":
        return tensor
    for hook in _hooks(module):
        weights = getattr(hook, "weights_map", None)
        if weights is not None:
            try:
                value = weights[name]
            except KeyError:
                continue
            assert isinstance(value, torch.Tensor)
            return value
    raise ConfigError(f"{type(module).__name__}.{name} is on the meta device and has no offloaded copy")


def check_weights_resident(model: nn.Module, what: str) -> None:
    """ConfigError, naming `what` and the remedy, when any parameter is offloaded."""
    offloaded = offloaded_parameters(model)
    if offloaded:
        raise ConfigError(
            f"{what} needs every weight in device memory, but the device_map offloaded {len(offloaded)} "
            f"parameters (e.g. {offloaded[0]}) to the CPU or disk: give the devices more room "
            "(SELPRUNE_MAX_MEMORY) or load the model without SELPRUNE_DEVICE_MAP"
        )
