"""The core's __all__ names exactly what it exports, and every public module's __all__ is honest."""

from __future__ import annotations

import importlib
import pkgutil

import selprune_core


def test_all_names_exist_and_are_sorted_uniquely():
    assert len(set(selprune_core.__all__)) == len(selprune_core.__all__)
    for name in selprune_core.__all__:
        assert hasattr(selprune_core, name), name


def test_module_all_lists_only_defined_names():
    for info in pkgutil.iter_modules(selprune_core.__path__):
        module = importlib.import_module(f"selprune_core.{info.name}")
        for name in getattr(module, "__all__", []):
            assert hasattr(module, name), f"selprune_core.{info.name}.__all__ names missing {name}"
