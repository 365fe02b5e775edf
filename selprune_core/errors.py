"""Errors raised by the selective-pruning core.

Hierarchy::

    SelPruneError                      base of everything the core raises on purpose
    ├── ConfigError                    a setting is out of range or inconsistent (caller's fault)
    ├── DatasetError                   a dataset reference cannot be resolved
    │   ├── DatasetNotFoundError       missing file, unknown builtin name, unreachable hub id
    │   └── EmptyDatasetError          the reference resolved to no usable text
    ├── ModelLoadError                 a model reference cannot be loaded
    ├── UnsupportedArchitectureError   no hook sites in the model's structure (or a mixture of experts)
    ├── MaskMismatchError              a mask does not fit the model it is applied to
    ├── CancelledError                 the caller's cancellation check asked to stop
    └── ScorerUnavailableError         an optional scorer's package is not installed

Every class name is stable: the worker ships it across processes as data and the gateway maps it to an
HTTP status by name.
"""

from __future__ import annotations

__all__ = [
    "SelPruneError",
    "ConfigError",
    "DatasetError",
    "DatasetNotFoundError",
    "EmptyDatasetError",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "MaskMismatchError",
    "CancelledError",
    "ScorerUnavailableError",
]


class SelPruneError(Exception):
    """Base class for errors raised on purpose by selprune_core."""


class ConfigError(SelPruneError, ValueError):
    """A setting is out of range or inconsistent with another."""


class DatasetError(SelPruneError):
    """A dataset reference cannot be turned into texts."""


class DatasetNotFoundError(DatasetError):
    """The file, builtin corpus or hub dataset named by a reference does not exist or cannot be reached."""


class EmptyDatasetError(DatasetError):
    """The reference resolved, but no usable text is left (after filtering or splitting)."""


class ModelLoadError(SelPruneError):
    """A model reference (hub id, folder, GGUF file, embedded name) cannot be loaded."""


class UnsupportedArchitectureError(SelPruneError):
    """The model has no hook sites selprune can find, or is one it refuses (mixture of experts)."""


class MaskMismatchError(SelPruneError):
    """A mask's fingerprint or shapes do not match the model it is applied to."""


class CancelledError(SelPruneError):
    """The caller asked to stop between pruning steps."""


class ScorerUnavailableError(SelPruneError):
    """An optional toxicity scorer cannot be used because its package is missing."""
