"""Forward pre-hooks scoped to a block and to the thread that registered them.

A worker holds one copy of each model and shares it between its job lane (collecting statistics,
evaluating a job's mask) and its serving lane (generating through request masks), each in its own
thread. Module hooks are global to the module, so an unscoped hook registered by one lane would also
fire inside the other lane's forward passes: a job's mask would leak into served text and served
tokens into a job's statistics. Every hook we register goes through `scoped_pre_hooks`, which makes it
a no-op in any other thread and removes it when the block exits, even on error.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn

__all__ = ["PreHook", "scoped_pre_hooks"]

# A forward pre-hook: returns new positional args, or None to leave them unchanged.
PreHook = Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...] | None]


def _only_in(thread_id: int, hook: PreHook) -> PreHook:
    def scoped(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if threading.get_ident() != thread_id:
            return None
        return hook(module, args)

    return scoped


@contextlib.contextmanager
def scoped_pre_hooks(hooks: Iterable[tuple[nn.Module, PreHook]]) -> Iterator[None]:
    """Register each (module, hook) pair for the calling thread only, for the duration of the block."""
    owner = threading.get_ident()
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_pre_hook(_only_in(owner, hook)))
        yield
    finally:
        for handle in handles:
            handle.remove()
