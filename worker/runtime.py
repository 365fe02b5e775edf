"""ModelRuntime: what a worker process holds across jobs.

Models load lazily into a small LRU cache (a worker may serve a few models, but each costs GPU
memory), datasets resolve against the configured data root and cache folder. Built once at start-up,
never per job, and shared by the job and serving lanes of one process.

The cache holds causal language models, masked LMs and image classifiers alike (worker/model_refs.py
decides which a reference names). Callers ask for the kind they need, `model` (a causal LM),
`masked_lm` or `classifier`, and get a ConfigError naming the mismatch when the reference is of
another kind.

What a job may name is confined here, from the worker's settings: local models must lie under
`models_root` (except the operator's own `trusted_models`, SELPRUNE_MODELS), and hub datasets pass
`hub_datasets` (SELPRUNE_HUB_DATASETS, protocol/hub_policy.py). The defaults (no root, any hub
dataset) are for trusted callers: the local command line and tests.

The model builtins (``corpora.MODEL_BUILTINS``: a model's own toxic and clean continuations of the
``toxic`` prompts) are resolved here, with the job's model: generated once per model into the disk cache
by ``selprune_core.self_contrast`` and held in memory per (fingerprint, name) for the process's life.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

from protocol import BuiltinData, FileData, HubData, ImageData, InlineData
from protocol.hub_policy import HUB_ANY, hub_dataset_refusal, parse_hub_datasets
from selprune_core.corpora import MODEL_BUILTINS
from selprune_core.data import resolve_dataset
from selprune_core.errors import ConfigError
from selprune_core.loading import LoadedModel, load_model
from selprune_core.mlm_measure import MaskedLM
from selprune_core.mlm_model import MlmRecipe
from selprune_core.self_contrast import CLEAN_NAME, TOXIC_NAME, builtin_contrast
from selprune_core.splits import TextSplits
from selprune_core.vision_model import VitRecipe
from worker.convert import to_dataset_ref
from worker.image_data import ImageSplitSets, image_splits
from worker.image_models import LoadedClassifier, load_classifier
from worker.mlm_models import load_mlm
from worker.model_refs import ModelKind, model_kind

log = logging.getLogger(__name__)

LoadedT = TypeVar("LoadedT", LoadedModel, LoadedClassifier, MaskedLM)

DatasetSpecModel = InlineData | FileData | HubData | BuiltinData | ImageData
Loaded = LoadedModel | LoadedClassifier | MaskedLM
_KIND_NAMES = {
    LoadedModel: "a language model (causal)",
    LoadedClassifier: "an image classifier",
    MaskedLM: "a masked LM",
}


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
        models_root: Path | None = None,
        trusted_models: Collection[str] = (),
        hub_datasets: str = HUB_ANY,
        device_map: str | None = None,
        max_memory: str | None = None,
        digits_recipe: VitRecipe | None = None,
        mlm_recipe: MlmRecipe | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.data_root = Path(data_root)
        self.models_root = None if models_root is None else Path(models_root)  # None: any local path
        self.trusted_models = frozenset(trusted_models)  # refs loaded as given, outside the root too
        self.hub_datasets = parse_hub_datasets(hub_datasets)  # "off", "any" or an allowlist
        self.device = device
        self.dtype = dtype
        self.device_map = device_map or None  # accelerate's strategy ("auto"); None: all on `device`
        self.max_memory = max_memory or None  # "0=20GiB,cpu=60GiB": what the map may put on each device
        self.max_models = max(1, max_models)
        self.max_texts = max_texts  # texts per dataset split, and images per image data set
        self.digits_recipe = (
            digits_recipe  # the builtin digits ViT's recipe (None: the default; tests shrink it)
        )
        self.mlm_recipe = mlm_recipe  # the builtin code/prose MLM's recipe (None: the default)
        self._models: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()  # guards _models and _loading; never held while loading
        self._loading: dict[str, threading.Lock] = {}  # ref -> lock held by the caller loading it
        self._contrast: dict[tuple[str, str], TextSplits] = {}  # (fingerprint, builtin name) -> texts
        self._contrast_lock = threading.Lock()  # held while generating: one generation per model at once

    def model(self, ref: str) -> LoadedModel:
        """The causal LM `ref` names; ConfigError if it names another kind."""
        return self._of_kind(ref, LoadedModel, "this needs a causal language model")

    def classifier(self, ref: str) -> LoadedClassifier:
        """The image classifier `ref` names; ConfigError if it names another kind."""
        return self._of_kind(
            ref,
            LoadedClassifier,
            "this needs an image classifier (a *ForImageClassification folder or builtin:vit-digits)",
        )

    def masked_lm(self, ref: str) -> MaskedLM:
        """The masked LM `ref` names; ConfigError if it names another kind."""
        return self._of_kind(
            ref, MaskedLM, "this needs a masked LM (a *ForMaskedLM folder or builtin:mlm-code-prose)"
        )

    def kind(self, ref: str) -> ModelKind:
        """What `ref` names, from the reference alone (nothing loads)."""
        root = None if ref in self.trusted_models else self.models_root
        return model_kind(ref, root)

    def _of_kind(self, ref: str, kind: type[LoadedT], needs: str) -> LoadedT:
        loaded = self.loaded(ref)
        if not isinstance(loaded, kind):
            uses = {
                LoadedModel: "causal LMs generate and take text datasets",
                LoadedClassifier: "image classifiers take image datasets and /v1/classify",
                MaskedLM: "masked LMs take text datasets, the masked_token metric and /v1/fill-mask",
            }[type(loaded)]
            raise ConfigError(f"model {ref!r} is {_KIND_NAMES[type(loaded)]}; {needs} ({uses})")
        return loaded

    def loaded(self, ref: str) -> Loaded:
        """The loaded model for `ref`, of whichever kind, loading it (and evicting the least recently
        used) if needed.

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
            where = f"device_map={self.device_map}" if self.device_map else f"device={self.device}"
            log.info("loading model %s (%s, dtype=%s)", ref, where, self.dtype)
            try:
                loaded = self._load(ref)
            finally:
                with self._lock:
                    self._loading.pop(ref, None)
            with self._lock:
                self._evict(keep=self.max_models - 1)
                self._models[ref] = loaded
            return loaded

    def _load(self, ref: str) -> Loaded:
        root = None if ref in self.trusted_models else self.models_root
        kind = model_kind(ref, root)
        if kind == "masked_lm":
            return load_mlm(
                ref,
                cache_dir=self.cache_dir,
                device=self.device,
                dtype=self.dtype,
                models_root=root,
                recipe=self.mlm_recipe,
            )
        if kind == "image_classifier":
            return load_classifier(
                ref,
                cache_dir=self.cache_dir,
                device=self.device,
                dtype=self.dtype,
                models_root=root,
                digits_recipe=self.digits_recipe,
            )
        return load_model(
            ref,
            cache_dir=self.cache_dir,
            device=self.device,
            dtype=self.dtype,
            models_root=root,
            device_map=self.device_map,
            max_memory=self.max_memory,
        )

    def _evict(self, keep: int) -> None:
        """Drop least recently used models until `keep` remain (callers holding one keep using it)."""
        while len(self._models) > keep:
            evicted, _ = self._models.popitem(last=False)
            log.info("evicting model %s from the cache", evicted)
            _release_device_memory()

    def loaded_models(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def dataset(
        self,
        spec: DatasetSpecModel,
        model_ref: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> TextSplits:
        """Resolve a dataset spec; the model builtins need `model_ref`, the model they are generated by.

        Generating those takes minutes the first time on a CPU: `on_progress(prompts_done, total)`
        hears about it.
        """
        if isinstance(spec, ImageData):
            raise ConfigError(f"{spec.describe()}: image datasets are read by image classifiers, not texts")
        if isinstance(spec, BuiltinData) and spec.name in MODEL_BUILTINS:
            if model_ref is None:
                raise ConfigError(f"builtin dataset {spec.name!r} is generated by a model: give model_ref")
            splits = self._model_builtin(spec.name, model_ref, on_progress)
            cap = self.max_texts
            return TextSplits(splits.name, splits.train[:cap], splits.heldout[:cap])
        if isinstance(spec, HubData) and (refusal := hub_dataset_refusal(self.hub_datasets, spec.id)):
            raise ConfigError(refusal)
        return resolve_dataset(
            to_dataset_ref(spec), data_root=self.data_root, cache_dir=self.cache_dir, max_texts=self.max_texts
        )

    def image_dataset(self, spec: ImageData, classifier: LoadedClassifier) -> ImageSplitSets:
        """An image dataset spec resolved (split, preprocessed, filtered) for `classifier`."""
        return image_splits(spec, classifier, data_root=self.data_root, max_images=self.max_texts)

    def _model_builtin(
        self, name: str, model_ref: str, on_progress: Callable[[int, int], None] | None
    ) -> TextSplits:
        """The model's own toxic or clean continuations, generated (or read from disk) once per process."""
        loaded = self.model(model_ref)
        with self._contrast_lock:
            key = (loaded.fingerprint, name)
            if key not in self._contrast:
                flagged, clean = builtin_contrast(
                    loaded.model, loaded.tokenizer, loaded.fingerprint, self.cache_dir, on_progress
                )
                self._contrast[(loaded.fingerprint, TOXIC_NAME)] = flagged
                self._contrast[(loaded.fingerprint, CLEAN_NAME)] = clean
            return self._contrast[key]


def _release_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
