"""Self-contrast corpora: a model's own toxic and clean continuations of the same toxic prompts.

Selective pruning scores each neuron by how much more it fires on the forget set than on the retain set,
so whatever tells the two sets apart is what gets pruned. The old detox recipe contrasted toxic web
prefixes (short, informal, Reddit-register English) with Python-documentation prose (long, formal,
technical): register, domain and length differed all at once, and the ratio picked "short informal
English" neurons rather than toxicity ones.

Here both sets come from one source: the model samples continuations of the training-side toxic prompt
prefixes (builtin ``toxic``'s train part; the held-out evaluation prompts are never among them), a
toxicity scorer flags some, and

* ``toxic_continuations`` holds prompt + continuation for the flagged samples (score > threshold),
* ``clean_continuations`` holds prompt + continuation for the others,

so the forget and retain texts share prompts, register and length and differ in whether the model went
on to say something toxic. Empty continuations (EOS at once) carry no contrast and are dropped.

Generation costs minutes on a CPU, so the samples are cached on disk once per model and setting: a JSONL
file (prompt, continuation, score per line) and a JSON sidecar with the settings and counts, both named
by a hash of the model fingerprint and every setting that changes the texts. Both are written to a
temporary file and renamed into place, the sidecar last, so a crash never leaves a cache that reads as
complete; reading a cache never regenerates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune_core.config import SamplingConfig
from selprune_core.errors import ConfigError, DatasetError, EmptyDatasetError
from selprune_core.generation import generate
from selprune_core.placement import input_device
from selprune_core.splits import TextSplits, split_texts
from selprune_core.toxicity import ToxicityScorer

__all__ = [
    "CLEAN_NAME",
    "FORMAT_VERSION",
    "TOXIC_NAME",
    "ContinuationConfig",
    "ContrastSample",
    "OnProgress",
    "cache_paths",
    "cache_key",
    "generate_contrast",
    "load_cached",
]

log = logging.getLogger(__name__)

TOXIC_NAME = "toxic_continuations"
CLEAN_NAME = "clean_continuations"
# Bump when the way samples are generated, filtered or stored changes: old caches are then ignored.
FORMAT_VERSION = 1
_SUBDIR = "self_contrast"
_LOG_EVERY_S = 15.0

# Called after each generated batch with (prompts done, prompts in all).
OnProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class ContinuationConfig:
    """How the continuations are sampled and split; every field but `batch_size` keys the cache."""

    samples_per_prompt: int = 1  # every training prompt once: 2139 samples, about 10 CPU-minutes
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0
    scorer: str = "profanity"  # must equal the `name` of the scorer passed to generate_contrast
    threshold: float = 0.8  # a continuation is flagged when its score exceeds this
    max_prompts: int | None = None  # the first N prompts; None takes them all
    batch_size: int = 32  # rows per generate call; the texts do not depend on it (per-row seeds)

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"max_prompts must be >= 1 or None, got {self.max_prompts}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        self.sampling()  # SamplingConfig checks max_new_tokens, temperature, top_k and top_p

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
        )


@dataclass(frozen=True)
class ContrastSample:
    prompt: str
    continuation: str
    score: float  # the scorer's score of the continuation alone

    @property
    def text(self) -> str:
        return self.prompt + self.continuation


def cache_key(
    fingerprint: str, prompts: Sequence[str], cfg: ContinuationConfig, *, dtype: str, device: str
) -> dict[str, Any]:
    """Everything the cached samples depend on, as a JSON-ready dict.

    `prompts` are the prompts actually used (after `max_prompts`); they enter as a count and a sha256,
    so a changed prompt file cannot reuse a stale cache. Sampling runs on per-row generators of the
    model's device, in its dtype, so the same seed gives other texts on another device type or dtype:
    both are part of the key.
    """
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(hashlib.sha256(prompt.encode()).digest())
    settings = asdict(cfg)
    del settings["batch_size"]
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "dtype": dtype,
        "device_type": device,
        "n_prompts": len(prompts),
        "prompts_sha256": digest.hexdigest(),
        **settings,
    }


def cache_paths(cache_dir: Path, key: dict[str, Any]) -> tuple[Path, Path]:
    """(samples .jsonl, sidecar .json) for a key, under ``cache_dir/self_contrast``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = f"{key['fingerprint']}-{digest}"
    folder = Path(cache_dir) / _SUBDIR
    return folder / f"{stem}.jsonl", folder / f"{stem}.json"


@torch.no_grad()
def generate_contrast(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    fingerprint: str,
    prompts: Sequence[str],
    cfg: ContinuationConfig,
    scorer: ToxicityScorer,
    cache_dir: Path,
    on_progress: OnProgress | None = None,
) -> tuple[TextSplits, TextSplits]:
    """(flagged, clean) prompt + continuation texts of the model, each split into train / held-out.

    Reads the cache for this model and setting when there is one; otherwise samples
    `cfg.samples_per_prompt` continuations of each prompt, scores each continuation alone, writes the
    cache and splits. Raises EmptyDatasetError when one side has no sample at all (the cache is kept).
    """
    if scorer.name != cfg.scorer:
        raise ConfigError(f"the scorer passed is {scorer.name!r} but the config names {cfg.scorer!r}")
    prompts = [p for p in prompts if p.strip()][: cfg.max_prompts]
    if not prompts:
        raise EmptyDatasetError("generate_contrast got no non-empty prompt")
    param = next(model.parameters())
    key = cache_key(
        fingerprint,
        prompts,
        cfg,
        dtype=str(param.dtype).removeprefix("torch."),
        device=input_device(model).type,
    )
    data_path, meta_path = cache_paths(cache_dir, key)
    samples = load_cached(data_path, meta_path, key)
    if samples is None:
        samples, header = _sample(model, tokenizer, prompts, cfg, scorer, on_progress)
        _write_cache(data_path, meta_path, key, header, samples)
    else:
        log.info("self-contrast: %d samples from the cache %s", len(samples), data_path.name)
    return _splits(samples, cfg.threshold, data_path)


def builtin_contrast(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    fingerprint: str,
    cache_dir: Path,
    on_progress: OnProgress | None = None,
) -> tuple[TextSplits, TextSplits]:
    """The builtins `toxic_continuations` / `clean_continuations`: `generate_contrast` with the default
    settings and scorer over the train prompts of builtin `toxic` (needs `selprune setup`)."""
    from selprune_core.corpora import load_builtin
    from selprune_core.toxicity import get_scorer

    cfg = ContinuationConfig()
    prompts = load_builtin("toxic", cache_dir).train
    return generate_contrast(
        model, tokenizer, fingerprint, prompts, cfg, get_scorer(cfg.scorer), cache_dir, on_progress
    )


def load_cached(data_path: Path, meta_path: Path, key: dict[str, Any]) -> list[ContrastSample] | None:
    """The cached samples, or None when there is no complete cache for exactly this key."""
    if not meta_path.is_file() or not data_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != key:  # a hash collision or a hand-edited sidecar
            log.warning("self-contrast cache %s holds another key; regenerating", meta_path.name)
            return None
        samples = [
            ContrastSample(str(r["prompt"]), str(r["continuation"]), float(r["score"]))
            for line in data_path.read_text(encoding="utf-8").splitlines()
            if line.strip()
            for r in [json.loads(line)]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"self-contrast cache {data_path} is unreadable ({exc}); delete it") from exc
    if len(samples) != meta.get("counts", {}).get("kept"):
        raise DatasetError(
            f"self-contrast cache {data_path} holds {len(samples)} samples, its sidecar says "
            f"{meta.get('counts', {}).get('kept')}; delete both files"
        )
    return samples


def _sample(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    cfg: ContinuationConfig,
    scorer: ToxicityScorer,
    on_progress: OnProgress | None,
) -> tuple[list[ContrastSample], dict[str, Any]]:
    model.eval()
    m = cfg.samples_per_prompt
    # Prompt-major rows: the samples of prompt i are rows i*m .. i*m + m - 1. Row r samples with seed
    # cfg.seed + r whatever the chunking, as `generate` seeds row i of a call with its seed + i.
    rows = [p for p in prompts for _ in range(m)]
    base = cfg.sampling()
    # Whole prompts per chunk, so that progress counts prompts; at least one prompt per chunk.
    step = max(1, cfg.batch_size // m) * m
    log.info(
        "self-contrast: sampling %d continuation(s) of %d prompts (%d new tokens, %d rows a batch)",
        m,
        len(prompts),
        cfg.max_new_tokens,
        step,
    )
    start_time = last_log = time.monotonic()
    continuations: list[str] = []
    new_tokens = 0
    for start in range(0, len(rows), step):
        sampling = SamplingConfig(**{**asdict(base), "seed": cfg.seed + start})
        generations = generate(model, tokenizer, rows[start : start + step], sampling, batch_size=step)
        continuations += [g.text for g in generations]
        new_tokens += sum(g.completion_tokens for g in generations)
        done = len(continuations) // m
        if on_progress is not None:
            on_progress(done, len(prompts))
        now = time.monotonic()
        if now - last_log >= _LOG_EVERY_S or done == len(prompts):
            last_log = now
            elapsed = now - start_time
            log.info(
                "self-contrast: %d / %d prompts, %.0f s elapsed, about %.0f s left",
                done,
                len(prompts),
                elapsed,
                elapsed / done * (len(prompts) - done),
            )
    generate_s = time.monotonic() - start_time
    kept = [(p, c) for p, c in zip(rows, continuations, strict=True) if c.strip()]
    scores = scorer.score([c for _, c in kept])
    if len(scores) != len(kept) or not all(math.isfinite(s) for s in scores):
        raise DatasetError(
            f"scorer {scorer.name} returned {len(scores)} scores for {len(kept)} texts or a NaN"
        )
    samples = [ContrastSample(p, c, float(s)) for (p, c), s in zip(kept, scores, strict=True)]
    flagged = sum(s.score > cfg.threshold for s in samples)
    header = {
        "counts": {
            "prompts": len(prompts),
            "samples": len(rows),
            "empty": len(rows) - len(kept),
            "kept": len(samples),
            "flagged": flagged,
            "clean": len(samples) - flagged,
            "new_tokens": new_tokens,
        },
        "generate_seconds": round(generate_s, 1),
    }
    log.info(
        "self-contrast: %d samples in %.0f s: %d flagged, %d clean, %d empty dropped",
        len(rows),
        generate_s,
        flagged,
        len(samples) - flagged,
        len(rows) - len(kept),
    )
    return samples, header


def _write_cache(
    data_path: Path,
    meta_path: Path,
    key: dict[str, Any],
    header: dict[str, Any],
    samples: Sequence[ContrastSample],
) -> None:
    lines = "".join(json.dumps(asdict(s), ensure_ascii=False) + "\n" for s in samples)
    meta = {"key": key, **header, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(data_path, lines)
    _atomic_write(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")  # last: marks it complete
    log.info("self-contrast: cached %d samples in %s", len(samples), data_path)


def _atomic_write(path: Path, text: str) -> None:
    """Write a unique temporary file beside `path` (created under the umask, unlike mkstemp's 0600), rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _splits(
    samples: Sequence[ContrastSample], threshold: float, source: Path
) -> tuple[TextSplits, TextSplits]:
    flagged = [s.text for s in samples if s.score > threshold]
    clean = [s.text for s in samples if not s.score > threshold]
    for name, texts in ((TOXIC_NAME, flagged), (CLEAN_NAME, clean)):
        if not texts:
            raise EmptyDatasetError(
                f"builtin:{name}: none of the {len(samples)} sampled continuations landed on this side of "
                f"the threshold {threshold} (cache {source.name}); change the threshold or the sampling"
            )
    return split_texts(f"builtin:{TOXIC_NAME}", flagged), split_texts(f"builtin:{CLEAN_NAME}", clean)
