from __future__ import annotations

import math

import pytest
import torch

from selprune_core.config import CollectConfig, EvalConfig, PruneConfig, StopConfig
from selprune_core.errors import CancelledError, ConfigError
from selprune_core.masks import NeuronMask
from selprune_core.pruning import prune_iteratively
from selprune_core.sites import model_fingerprint, resolve_sites
from tests.helpers import CORPUS

CODE = [t for t in CORPUS if "def " in t or "import" in t or "for " in t or "class" in t]
PROSE = [t for t in CORPUS if t not in CODE]
EVAL = {"forget": CODE, "retain": PROSE}


def _cfg(**kw):
    base = dict(
        ff_frac=0.1,
        attn_frac=0.05,
        steps=3,
        collect=CollectConfig(token_limit=64, sample_tokens=10_000, batch_size=4),
        eval=EvalConfig(
            token_limit=64, sample_tokens=10_000, batch_size=4, bootstrap_samples=20, skip_common=5
        ),
    )
    base.update(kw)
    return PruneConfig(**base)


def _run(model, tokenizer, cfg, **kw):
    sites = resolve_sites(model)
    return prune_iteratively(model, tokenizer, sites, model_fingerprint(model), CODE, PROSE, EVAL, cfg, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_step_prunes_its_fraction_and_reports(tiny_model, tokenizer, arch):
    model = tiny_model(arch)
    sites = resolve_sites(model)
    seen = []
    result = _run(model, tokenizer, _cfg(), on_step=lambda report, mask: seen.append((report, mask)))
    assert [r.step for r, _ in seen] == [0, 1, 2, 3] and result.stopped_reason == "steps"
    ff_k = math.floor(0.1 * sites.n_layers * sites.d_mlp)
    attn_k = math.floor(0.05 * sites.n_layers * sites.d_attn)
    previous = None
    for report, mask in seen[1:]:
        assert report.ff_selected == ff_k and report.attn_selected == attn_k
        assert sum(report.ff_per_layer) == ff_k and report.ff_pruned == ff_k * report.step
        assert report.ff_threshold is not None and report.metrics["forget"]["top1"] is not None
        if previous is not None:  # masks only ever lose neurons
            assert not (mask.ff_keep & ~previous.ff_keep).any()
        previous = mask
    assert seen[0][0].drops == {"forget": 0.0, "retain": 0.0}
    assert result.mask.mask_id == seen[-1][1].mask_id == seen[-1][0].mask_id


def test_model_is_left_unhooked_and_unchanged(tiny_model, tokenizer):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _run(model, tokenizer, _cfg(steps=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_resume_continues_exactly(tiny_model, tokenizer):
    model = tiny_model("llama")
    full = []
    _run(model, tokenizer, _cfg(), on_step=lambda r, m: full.append((r, m)))
    partial = []

    def stop_after_two(report, mask):
        partial.append((report, mask))
        if report.step == 1:
            raise KeyboardInterrupt  # the process dies after persisting step 1

    with pytest.raises(KeyboardInterrupt):
        _run(model, tokenizer, _cfg(), on_step=stop_after_two)
    resumed = []
    result = _run(
        model,
        tokenizer,
        _cfg(),
        history=[r for r, _ in partial],
        resume_mask=partial[-1][1],
        on_step=lambda r, m: resumed.append((r, m)),
    )
    assert [r.step for r, _ in resumed] == [2, 3]
    assert [m.mask_id for _, m in resumed] == [m.mask_id for _, m in full[2:]]
    assert result.mask.mask_id == full[-1][1].mask_id and len(result.history) == 4


def test_static_mode_prunes_cumulative_top(tiny_model, tokenizer):
    model = tiny_model("llama")
    sites = resolve_sites(model)
    result = _run(model, tokenizer, _cfg(recalculate=False, attn_frac=0.0))
    n = sites.n_layers * sites.d_mlp
    assert [r.ff_pruned for r in result.history] == [0] + [math.floor(min(1, 0.1 * i) * n) for i in (1, 2, 3)]


def test_random_baseline_per_layer(tiny_model, tokenizer):
    model = tiny_model("gpt2")
    sites = resolve_sites(model)
    result = _run(model, tokenizer, _cfg(random_baseline=True))
    assert all(r.ff_per_layer == [math.floor(0.1 * sites.d_mlp)] * sites.n_layers for r in result.history[1:])
    again = _run(model, tokenizer, _cfg(random_baseline=True))
    assert again.mask.mask_id == result.mask.mask_id
    other = _run(model, tokenizer, _cfg(random_baseline=True, seed=1))
    assert other.mask.mask_id != result.mask.mask_id


def test_whole_heads(tiny_model, tokenizer):
    model = tiny_model("llama")
    sites = resolve_sites(model)
    result = _run(model, tokenizer, _cfg(ff_frac=0.0, attn_frac=0.25, prune_heads=True, steps=1))
    per_head = (~result.mask.attn_keep).view(sites.n_layers, sites.n_heads, sites.d_head)
    assert per_head.all(-1).sum() == 2  # floor(0.25 * 8 heads)
    assert (per_head.any(-1) == per_head.all(-1)).all()  # heads are pruned whole


def test_stop_at_target_and_cancel(tiny_model, tokenizer):
    model = tiny_model("llama")
    result = _run(model, tokenizer, _cfg(ff_frac=0.3, steps=10, stop=StopConfig(max_retain_drop=0.0)))
    assert result.stopped_reason in ("max_retain_drop", "steps")
    if result.stopped_reason == "max_retain_drop":
        assert result.history[-1].drops["retain"] > 0 and len(result.history) < 11
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(CancelledError):
        _run(model, tokenizer, _cfg(), should_stop=should_stop)


def test_start_mask_is_respected_and_config_errors(tiny_model, tokenizer):
    model = tiny_model("llama")
    sites = resolve_sites(model)
    start = NeuronMask.full(sites, model_fingerprint(model))
    keep = start.ff_keep.clone()
    keep[0, :10] = False
    start = NeuronMask(start.fingerprint, keep, start.attn_keep, sites.n_heads)
    result = _run(model, tokenizer, _cfg(steps=1), start_mask=start)
    assert not result.mask.ff_keep[0, :10].any()
    with pytest.raises(ConfigError, match="forget"):
        sites = resolve_sites(model)
        prune_iteratively(
            model,
            tokenizer,
            sites,
            start.fingerprint,
            CODE,
            PROSE,
            {"retain": PROSE},
            _cfg(stop=StopConfig(forget_drop=0.5)),
        )
    with pytest.raises(ConfigError):
        PruneConfig(ff_frac=-0.1)
    with pytest.raises(ConfigError):
        PruneConfig(ff_frac=0.0, attn_frac=0.0)
