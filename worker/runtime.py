"""ModelRuntime: what a worker process holds across jobs.

Models load lazily into a small LRU cache (a worker may serve a few models, but each costs GPU
memory), datasets resolve against the configured data root and cache folder. Built once at start-up,
never per job, and shared by the job and serving lanes of one process.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

from selprune_core.data import TextSplits, resolve_dataset
from selprune_core.loading import LoadedModel, load_model
from worker.payloads import BuiltinData, FileData, HubData, InlineData, to_dataset_ref

log = logging.getLogger(__name__)

DatasetSpecModel = InlineData | FileData | HubData | BuiltinData


class ModelRuntime:
    def __init__(
        self,
        *,
        cache_dir: Path,
        data_root: Path,
        device: str = "auto",
        dtype: str = "auto",
        max_models: int = 2,
        max_texts: int = 50_000,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.data_root = Path(data_root)
        self.device = device
        self.dtype = dtype
        self.max_models = max(1, max_models)
        self.max_texts = max_texts
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # guards _models and _loading; never held while loading
        self._loading: dict[str, threading.Lock] = {}  # ref -> lock held by the caller loading it

    def model(self, ref: str) -> LoadedModel:
        """The loaded model for `ref`, loading it (and evicting the least recently used) if needed.

        Loading happens outside the cache lock, under a lock of its own per ref: the job lane loading
        a new model (minutes, for a large one) must not stall the serving lane's lookups of models it
        already holds, and two callers asking for the same new model load it once.
        """
        with self._lock:
            if ref in self._models:
                self._models.move_to_end(ref)
                return self._models[ref]
            loading = self._loading.setdefault(ref, threading.Lock())
        with loading:
            with self._lock:
                if ref in self._models:  # another caller loaded it while we waited
                    self._models.move_to_end(ref)
                    return self._models[ref]
                self._evict(keep=self.max_models - 1)  # make room first: device memory is the limit
            log.info("loading model %s (device=%s, dtype=%s)", ref, self.device, self.dtype)
            try:
                loaded = load_model(ref, cache_dir=self.cache_dir, device=self.device, dtype=self.dtype)
            finally:
                with self._lock:
                    self._loading.pop(ref, None)
            with self._lock:
                self._evict(keep=self.max_models - 1)
                self._models[ref] = loaded
            return loaded

    def _evict(self, keep: int) -> None:
        """Drop least recently used models until `keep` remain (callers holding one keep using it)."""
        while len(self._models) > keep:
            evicted, _ = self._models.popitem(last=False)
            log.info("evicting model %s from the cache", evicted)
            _release_device_memory()

    def loaded_models(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def dataset(self, spec: DatasetSpecModel) -> TextSplits:
        return resolve_dataset(
            to_dataset_ref(spec), data_root=self.data_root, cache_dir=self.cache_dir, max_texts=self.max_texts
        )


def _release_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
