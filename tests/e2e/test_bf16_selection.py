"""bfloat16 weights select the neurons float32 weights select: dtype "auto" may pick bf16 (on GPUs, and
on CPUs with AVX512-BF16 or AMX) without changing what a job prunes.

The default job's first step (forget the built-in python_code, retain english_prose, the `selprune`
recipe's scoring and per-layer selection) is scored on the real embedded model in both dtypes, on
the same small budget of texts; the selected FF neurons, and the attention neurons at the same
fraction (the default prunes no attention), must overlap by at least 95%. Statistics are float64 in
either dtype (selprune_core/activations.py), so what differs is only the bf16 forward pass.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from protocol import PruneParams
from selprune_core.corpora import load_builtin
from selprune_core.loading import EMBEDDED_MODEL, LoadedModel, load_model
from selprune_core.masks import NeuronMask
from selprune_core.prune_measure import Measure, PruneCallbacks
from selprune_core.scoring import Selection, select_top_neurons
from tests.e2e.conftest import cache_dir, require_setup
from worker.convert import prune_config

pytestmark = pytest.mark.slow

MIN_OVERLAP = 0.95


@pytest.fixture(scope="module")
def embedded_bf16() -> LoadedModel:
    require_setup()
    return load_model(EMBEDDED_MODEL, cache_dir=cache_dir(), device="cpu", dtype="bfloat16")


def _first_step(loaded: LoadedModel, forget: list[str], retain: list[str]) -> tuple[Selection, Selection]:
    """The default job's first selection: scores through the full mask, each component's top fraction."""
    # A small budget: about 1000 tokens of 64-token texts per set (the last batch is kept whole).
    cfg = prune_config(PruneParams(collect_tokens=600, token_limit=64, batch_size=8))
    cfg = replace(cfg, attn_frac=cfg.attn_frac or cfg.ff_frac)
    full = NeuronMask.full(loaded.sites, loaded.fingerprint)
    scores = Measure(loaded, cfg, (forget, retain), {}, {}, PruneCallbacks()).score(full, 1)
    per_layer = cfg.selection == "per_layer"
    return (
        select_top_neurons(scores.ff, full.ff_keep, cfg.ff_frac, per_layer=per_layer),
        select_top_neurons(scores.attn, full.attn_keep, cfg.attn_frac, per_layer=per_layer),
    )


def test_bf16_selects_what_fp32_selects(embedded, embedded_bf16):
    assert embedded.fingerprint == embedded_bf16.fingerprint  # one mask fits both
    forget = load_builtin("python_code", cache_dir(), max_texts=200).train
    retain = load_builtin("english_prose", cache_dir()).train
    fp32 = _first_step(embedded, forget, retain)
    bf16 = _first_step(embedded_bf16, forget, retain)
    for name, want, got in zip(("ff", "attn"), fp32, bf16, strict=True):
        assert want.count == got.count > 0
        overlap = int((want.chosen & got.chosen).sum()) / want.count
        print(f"{name}: {want.count} selected, bf16/fp32 overlap {overlap:.4f}")
        assert overlap >= MIN_OVERLAP, f"{name}: bf16 selection overlaps fp32's by {overlap:.2%}"
