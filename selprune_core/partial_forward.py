"""Running a model only as far as the hooked sites: what collection reads and nothing after it.

Statistics come from pre-hooks on the last layer's projections at most, so collection runs the
decoder body (no LM head) and cuts each forward short once the last sites have been recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from selprune_core.batching import TokenBatch
from selprune_core.hooks import scoped_pre_hooks
from selprune_core.sites import ModelSites

__all__ = ["decoder_body", "stop_after_last_site", "forward_to_last_site"]


class _StopForward(Exception):
    """Raised once the last hooked site of a forward has been recorded: nothing after it is read."""


def decoder_body(model: nn.Module) -> nn.Module:
    """The model without its LM head (`base_model`: LlamaModel, GPT2Model, ...), or the model itself.

    Collection reads only the hooked sites inside the body, so the head's [tokens, vocab] product
    (49152 x 576 per token on the embedded model, about a fifth of a forward) is never computed.
    """
    body = getattr(model, "base_model", None)
    return body if isinstance(body, nn.Module) else model


@contextlib.contextmanager
def stop_after_last_site(sites: ModelSites) -> Iterator[None]:
    """Cut each forward short once both sites of the last layer have been seen (their pre-hooks ran).

    Registered after the recorders, so it fires after the last one records; the rest of the last
    layer (the FF projection itself, the final norm) is skipped. Parallel-residual families run the
    two sites in either order, so it waits for both.
    """
    last = (sites.ff_modules[-1], sites.attn_modules[-1])
    seen: set[int] = set()

    def mark(module: nn.Module, _args: tuple[torch.Tensor, ...]) -> None:
        seen.add(id(module))
        if len(seen) == len({id(m) for m in last}):
            seen.clear()
            raise _StopForward

    with scoped_pre_hooks([(module, mark) for module in last]):
        yield


def forward_to_last_site(body: nn.Module, batch: TokenBatch, device: torch.device) -> None:
    try:
        body(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            use_cache=False,
        )
    except _StopForward:
        pass
