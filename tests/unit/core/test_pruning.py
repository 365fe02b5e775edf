from __future__ import annotations

import math

import pytest
import torch

from selprune_core.config import BudgetConfig, CollectConfig, EvalConfig, PruneConfig, StopConfig
from selprune_core.errors import CancelledError, ConfigError
from selprune_core.loading import LoadedModel
from selprune_core.masks import NeuronMask
from selprune_core.pruning import PruneCallbacks, PruneOptions, PruneRun, prune_iteratively
from selprune_core.reports import StepReport
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


def _loaded(model, tokenizer):
    param = next(model.parameters())
    sites, fingerprint = resolve_sites(model), model_fingerprint(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        ref="tiny",
        fingerprint=fingerprint,
        device=param.device,
        dtype=param.dtype,
        sites=sites,
    )


def _run(model, tokenizer, cfg, **kw):
    return prune_iteratively(_loaded(model, tokenizer), CODE, PROSE, EVAL, cfg, **kw)


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


def test_random_baseline_prunes_as_many_as_a_selective_step_spread_over_layers(tiny_model, tokenizer):
    model = tiny_model("gpt2")
    sites = resolve_sites(model)
    result = _run(model, tokenizer, _cfg(random_baseline=True))
    ff_k = math.floor(0.1 * sites.n_layers * sites.d_mlp)
    attn_k = math.floor(0.05 * sites.n_layers * sites.d_attn)
    for r in result.history[1:]:
        assert sum(r.ff_per_layer) == ff_k and sum(r.attn_per_layer) == attn_k
        assert max(r.ff_per_layer) - min(r.ff_per_layer) <= 1  # as even as the total allows
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
        prune_iteratively(
            _loaded(model, tokenizer), CODE, PROSE, {"retain": PROSE}, _cfg(stop=StopConfig(forget_drop=0.5))
        )
    with pytest.raises(ConfigError):
        PruneConfig(ff_frac=-0.1)
    with pytest.raises(ConfigError):
        PruneConfig(ff_frac=0.0, attn_frac=0.0)


def test_random_baseline_matches_given_per_layer_counts(tiny_model, tokenizer):
    model = tiny_model("llama")
    selective = _run(model, tokenizer, _cfg(steps=2))
    counts = [(r.ff_per_layer, r.attn_per_layer) for r in selective.history[1:]]
    matched = _run(model, tokenizer, _cfg(steps=2, random_baseline=True), random_counts=counts)
    assert [(r.ff_per_layer, r.attn_per_layer) for r in matched.history[1:]] == counts
    assert matched.mask.pruned_counts()["ff_per_layer"] == selective.mask.pruned_counts()["ff_per_layer"]
    assert matched.mask.mask_id != selective.mask.mask_id


def test_random_heads_at_small_fractions_still_prune(tiny_model, tokenizer):
    model = tiny_model("llama")
    sites = resolve_sites(model)
    # 0.2 of 4 heads rounds down to 0 per layer; 0.2 of all 8 heads does not.
    cfg = _cfg(ff_frac=0.0, attn_frac=0.2, prune_heads=True, random_baseline=True, steps=1)
    result = _run(model, tokenizer, cfg)
    assert math.floor(0.2 * sites.n_heads) == 0
    per_head = (~result.mask.attn_keep).view(sites.n_layers, sites.n_heads, sites.d_head)
    assert per_head.all(-1).sum() == math.floor(0.2 * sites.n_layers * sites.n_heads) > 0
    assert (per_head.any(-1) == per_head.all(-1)).all()


def test_per_layer_quota(tiny_model, tokenizer):
    model = tiny_model("llama")
    sites = resolve_sites(model)
    result = _run(model, tokenizer, _cfg(steps=1, selection="per_layer"))
    assert result.history[1].ff_per_layer == [math.floor(0.1 * sites.d_mlp)] * sites.n_layers


def test_static_mode_never_returns_a_pruned_neuron(tiny_model, tokenizer):
    model = tiny_model("llama")
    seen = []
    _run(model, tokenizer, _cfg(recalculate=False, steps=4), on_step=lambda r, m: seen.append(m))
    for before, after in zip(seen, seen[1:], strict=False):
        assert not (after.ff_keep & ~before.ff_keep).any() and not (after.attn_keep & ~before.attn_keep).any()


def test_mean_ablation_stores_retain_means_of_pruned_neurons(tiny_model, tokenizer):
    from selprune_core.activations import collect_activations
    from selprune_core.batching import iter_token_batches
    from selprune_core.masking import apply_mask

    model = tiny_model("llama")
    sites = resolve_sites(model)
    cfg = _cfg(steps=1, offset_mode="retain_mean")
    result = _run(model, tokenizer, cfg)
    mask = result.mask
    assert mask.has_offsets
    batches = iter_token_batches(tokenizer, PROSE, token_limit=64, batch_size=4)
    with apply_mask(model, sites, NeuronMask.full(sites, mask.fingerprint)):
        stats = collect_activations(model, sites, batches, sample_tokens=10_000, which=("sum",))
    pruned = ~mask.ff_keep
    torch.testing.assert_close(mask.ff_offset[pruned], stats.ff.mean[pruned].float())
    assert (mask.ff_offset[mask.ff_keep] == 0).all()


def test_nan_scores_are_never_selected():
    from selprune_core.scoring import select_top_neurons

    scores = torch.tensor([[float("nan"), 1.0, 2.0, float("nan")]], dtype=torch.float64)
    keep = torch.ones(1, 4, dtype=torch.bool)
    sel = select_top_neurons(scores, keep, 1.0)
    assert sel.chosen.tolist() == [[False, True, True, False]] and sel.threshold == 1.0


# A random-init model predicts nothing right (top-1 0), but its perplexity moves by ~1e-3 per step.
@pytest.mark.parametrize("limit", [0.0, 5e-4])
def test_budget_never_accepts_a_step_over_it(tiny_model, tokenizer, limit):
    model = tiny_model("llama")
    budget = BudgetConfig(max_retain_ppl_increase=limit, shrink=0.5, min_frac_ratio=0.1)
    seen = []
    cfg = _cfg(ff_frac=0.3, attn_frac=0.1, steps=4, budget=budget)
    result = _run(model, tokenizer, cfg, on_step=lambda r, m: seen.append((r, m)))
    reports = result.history
    assert reports[0].budget["broken"] == []
    assert any(not r.accepted for r in reports), "no trial broke the budget: the test checks nothing"
    last_accepted = seen[0][1]
    for report, mask in seen[1:]:
        if report.accepted:
            assert report.budget["broken"] == [] and report.budget["retain_ppl_increase"] <= limit
            last_accepted = mask
        else:
            assert report.budget["broken"] and report.budget["retain_ppl_increase"] > limit
            assert mask.mask_id == last_accepted.mask_id  # the run stays on the last accepted mask
    for before, after in zip(
        reports, reports[1:], strict=False
    ):  # a retry is smaller than the trial it follows
        if not before.accepted:
            assert after.ff_frac == before.ff_frac * 0.5 and after.trial == before.trial + 1
    assert result.stopped_reason in ("budget_floor", "steps")
    assert result.mask.mask_id == last_accepted.mask_id


def test_budget_sets_are_what_the_budget_reads(tiny_model, tokenizer):
    from selprune_core.evaluation import evaluate_texts

    model = tiny_model("llama")
    budget = BudgetConfig(max_retain_drop=1.0, forget_target=0.0)
    val = {"forget": CODE[:2], "retain": PROSE[:2]}
    cfg = _cfg(steps=3, budget=budget)
    result = _run(model, tokenizer, cfg, budget_sets=val)
    assert result.stopped_reason == "forget_target" and result.history[-1].step == 0  # met before pruning
    direct = evaluate_texts(model, tokenizer, PROSE[:2], cfg.eval)
    assert result.history[0].budget["retain_perplexity"] == pytest.approx(direct.perplexity)
    assert result.history[0].metrics["retain"]["perplexity"] != pytest.approx(direct.perplexity)
    with pytest.raises(ConfigError, match="budget sets"):
        _run(model, tokenizer, _cfg(budget=budget), budget_sets={"retain": PROSE})


def test_a_run_steps_one_report_at_a_time_as_prune_iteratively_does(tiny_model, tokenizer):
    model = tiny_model("llama")
    whole = _run(model, tokenizer, _cfg())
    run = PruneRun(_loaded(model, tokenizer), CODE, PROSE, EVAL, _cfg())
    reports = []
    while not run.done:
        if (report := run.step()) is not None:
            reports.append(report)
            assert run.history[-1] is report and run.mask.mask_id == report.mask_id
    assert run.result is not None and run.result.stopped_reason == whole.stopped_reason
    assert [r.mask_id for r in reports] == [r.mask_id for r in whole.history]
    assert run.result.mask.mask_id == whole.mask.mask_id


def test_bad_settings_fail_in_the_constructor_before_any_work(tiny_model, tokenizer):
    model = tiny_model("llama")
    loaded = _loaded(model, tokenizer)
    progress = []
    callbacks = PruneCallbacks(on_progress=progress.append)
    rejected = StepReport(step=1, accepted=False)
    bad = [
        (_cfg(random_baseline=True, budget=BudgetConfig(max_retain_drop=0.1)), PruneOptions()),
        (_cfg(), PruneOptions(random_counts=[([1], [1])])),
        (_cfg(random_baseline=True), PruneOptions(random_counts=[([1], [1])])),  # one layer of two
        (_cfg(), PruneOptions(history=[StepReport(step=0), rejected])),
        (_cfg(stop=StopConfig(max_retain_drop=0.1)), PruneOptions(retain_eval="prose")),
    ]
    for cfg, options in bad:
        with pytest.raises(ConfigError):
            PruneRun(loaded, CODE, PROSE, EVAL, cfg, options, callbacks)
    assert progress == []
