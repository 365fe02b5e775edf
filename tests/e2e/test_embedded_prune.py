"""The paper's core claim on the real embedded model: pruning neurons selected for Python code
(retaining English prose) hurts code prediction more than prose, and more than random pruning of
the same number of neurons does."""

from __future__ import annotations

import pytest

from selprune_core.config import CollectConfig, EvalConfig, PruneConfig
from selprune_core.corpora import load_builtin
from selprune_core.evaluation import relative_drop
from selprune_core.pruning import prune_iteratively
from tests.e2e.conftest import cache_dir

pytestmark = pytest.mark.slow


def test_code_pruning_is_selective_and_beats_random(embedded):
    code = load_builtin("python_code", cache_dir(), max_texts=400)
    prose = load_builtin("english_prose", cache_dir())
    eval_sets = {"forget": code.heldout[:40], "retain": prose.heldout[:40]}
    cfg = PruneConfig(
        ff_frac=0.05,
        steps=1,
        collect=CollectConfig(token_limit=128, sample_tokens=4000, batch_size=8),
        eval=EvalConfig(token_limit=128, sample_tokens=1500, batch_size=8, bootstrap_samples=200),
    )
    args = (
        embedded.model,
        embedded.tokenizer,
        embedded.sites,
        embedded.fingerprint,
        code.train,
        prose.train,
        eval_sets,
    )
    selective = prune_iteratively(*args, cfg)
    before, after = selective.history[0].metrics, selective.history[-1].metrics
    random_cfg = PruneConfig(**{**cfg.__dict__, "random_baseline": True, "run_pre_test": False})
    random = prune_iteratively(*args, random_cfg).history[-1].metrics
    assert selective.mask.pruned_counts()["ff"] == int(0.05 * embedded.sites.n_layers * embedded.sites.d_mlp)

    drop = {name: relative_drop(before[name]["top1"], after[name]["top1"]) for name in eval_sets}
    random_drop = {name: relative_drop(before[name]["top1"], random[name]["top1"]) for name in eval_sets}
    print(f"selective drops {drop}, random drops {random_drop}")
    assert drop["forget"] > drop["retain"]
    assert drop["forget"] > random_drop["forget"]
    # The unpruned model actually predicts both sets (a broken load would give ~0 accuracy).
    assert before["forget"]["top1"] > 0.3 and before["retain"]["top1"] > 0.2
