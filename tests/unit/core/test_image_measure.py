"""Image classifiers through the core: statistics on image batches equal plain hooks, evaluation equals a
direct argmax, and a PruneRun driven by an ImageMeasure prunes exactly what it chose (selective and a
matched random baseline), on a tiny random-init ViT built in code."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageClassification

from selprune_core.activations import STAT_FIELDS
from selprune_core.config import BudgetConfig, CollectConfig, EvalConfig, PruneConfig
from selprune_core.errors import ConfigError
from selprune_core.image_measure import (
    ImageMeasure,
    collect_image_activations,
    evaluate_images,
    image_classifier,
)
from selprune_core.images import ImageSet
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.pruning import PruneCallbacks, PruneOptions, PruneRun
from selprune_core.scoring import select_top_neurons
from tests.helpers import site_inputs

SEQ = 17  # (8 / 2)^2 patches + CLS


def _vit(seed: int = 0):
    config = AutoConfig.for_model(
        "vit",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=8,
        patch_size=2,
        num_channels=1,
        num_labels=10,
    )
    torch.manual_seed(seed)
    model = AutoModelForImageClassification.from_config(config)
    model.eval()
    return model


def _images(n: int = 40, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10  # every class, 4 images each
    pixels = torch.randn(n, 1, 8, 8, generator=g) + labels[:, None, None, None] * 0.3
    return ImageSet(pixels, labels)


def _site_inputs(classifier, run) -> dict[str, torch.Tensor]:
    """Every FF / attention site input of `run`'s forwards: [layer, image, pos, d] float64."""
    return site_inputs(classifier.sites, run)


@pytest.mark.parametrize("skip_first", [0, 1], ids=["cls-counted", "cls-skipped"])
def test_image_stats_equal_direct_computation(skip_first):
    classifier = image_classifier(_vit())
    images = _images()
    stats = collect_image_activations(
        classifier.model, classifier.sites, images, batch_size=16, sample_tokens=10**9, skip_first=skip_first
    )
    direct = _site_inputs(classifier, lambda: classifier.model(pixel_values=images.pixels))
    assert stats.n_texts == len(images)
    for kind in ("ff", "attn"):
        x = direct[kind]  # [layer, image, pos, d]
        assert x.shape[2] == SEQ
        x = x[:, :, skip_first:].flatten(1, 2)  # [layer, tokens, d]: CLS (position 0) dropped or kept
        got = getattr(stats, kind)
        assert got.n == len(images) * (SEQ - skip_first)
        expected = {
            "sum": x.sum(1),
            "sum_sq": (x * x).sum(1),
            "sum_abs": x.abs().sum(1),
            "sum_sqrt": x.abs().sqrt().sum(1),
            "pos_count": (x > 0).double().sum(1),
        }
        for name in STAT_FIELDS:
            torch.testing.assert_close(getattr(got, name), expected[name], rtol=1e-5, atol=1e-5)


def test_image_stats_stop_after_the_token_budget():
    classifier = image_classifier(_vit())
    stats = collect_image_activations(
        classifier.model, classifier.sites, _images(), batch_size=8, sample_tokens=SEQ * 10
    )
    assert stats.n_texts == 16 and stats.n_tokens == 16 * SEQ  # the batch that exceeded it is kept whole


def test_image_evaluation_equals_direct_argmax():
    model, images = _vit(), _images()
    cfg = EvalConfig(topk=3, batch_size=16, bootstrap_samples=200)
    evaluated = evaluate_images(model, images, cfg, n_classes=10)
    with torch.no_grad():
        logits = model(pixel_values=images.pixels).logits  # [image, 10]
    correct = (logits.argmax(-1) == images.labels).double()
    top3 = (logits.topk(3, dim=-1).indices == images.labels[:, None]).any(-1).double()
    ce = torch.nn.functional.cross_entropy(logits, images.labels).item()
    result = evaluated.result
    assert result.top1 == pytest.approx(correct.mean().item())
    assert result.topk == pytest.approx(top3.mean().item())
    assert result.loss == pytest.approx(ce, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(ce), rel=1e-5)
    assert (result.skip_top1, result.skip_topk) == (result.top1, result.topk)  # no common targets
    assert result.n_tokens == result.n_texts == result.n_skip_tokens == len(images)
    for c in range(10):
        assert evaluated.per_class[c] == pytest.approx(correct[images.labels == c].mean().item())
    for name in ("top1", "topk", "loss"):
        lo, hi = result.ci[name]
        assert lo <= getattr(result, name) <= hi
    assert result.ci["top1"][0] < result.ci["top1"][1]  # a real interval on a mixed set
    assert evaluate_images(model, images.with_labels([3]), cfg, 10).per_class[4] is None


def _cfg(**overrides) -> PruneConfig:
    settings = dict(
        ff_frac=0.05,
        attn_frac=0.05,
        steps=2,
        collect=CollectConfig(batch_size=16),
        eval=EvalConfig(topk=3, batch_size=16, bootstrap_samples=50),
    )
    return PruneConfig(**(settings | overrides))


def _run(classifier, cfg, options=None):
    images = _images()
    forget, retain = images.with_labels([0]), images.without_labels([0])
    eval_sets = {"forget": forget, "retain": retain}
    masks: list[NeuronMask] = []
    callbacks = PruneCallbacks(on_step=lambda _report, mask: masks.append(mask))
    measure = ImageMeasure(classifier, cfg, (forget, retain), eval_sets, callbacks)
    run = PruneRun.with_measure(classifier, measure, eval_sets, cfg, options, callbacks)
    return run.run_to_end(), masks, measure


def test_selective_run_prunes_exactly_the_chosen_neurons_and_reports_both_sets():
    classifier = image_classifier(_vit())
    cfg = _cfg()
    result, masks, measure = _run(classifier, cfg)
    assert [r.step for r in result.history] == [0, 1, 2] and result.stopped_reason == "steps"
    for report in result.history:
        assert set(report.metrics) == {"forget", "retain"}
        assert report.metrics["forget"]["n_texts"] == 4 and report.metrics["retain"]["n_texts"] == 36
        forget_classes = report.extra["per_class"]["forget"]  # only class 0 is in the forget set
        assert forget_classes[0] == report.metrics["forget"]["top1"] and forget_classes[1:] == [None] * 9
    # Step 1 prunes the top 5% by the scores of the unpruned model, computed here again.
    full = NeuronMask.full(classifier.sites, classifier.fingerprint)
    scores = measure.score(full, 1)
    expected_ff = select_top_neurons(scores.ff, full.ff_keep, cfg.ff_frac).chosen
    expected_attn = select_top_neurons(scores.attn, full.attn_keep, cfg.attn_frac).chosen
    step1 = masks[1]
    assert torch.equal(~step1.ff_keep, expected_ff) and torch.equal(~step1.attn_keep, expected_attn)
    assert result.history[1].ff_selected == int(expected_ff.sum()) == math.floor(0.05 * 2 * 64)
    # Masks grow monotonically, and through the final mask exactly the pruned site inputs read 0.
    final = result.mask
    assert bool((final.ff_keep <= step1.ff_keep).all()) and final.pruned_counts()["ff"] == 2 * 6
    pixels = _images().pixels

    with apply_mask(classifier.model, classifier.sites, final):  # its hooks run before the capturing ones
        seen = _site_inputs(classifier, lambda: classifier.model(pixel_values=pixels))
    for kind, keep in (("ff", final.ff_keep), ("attn", final.attn_keep)):
        x = seen[kind]  # [layer, image, pos, d]
        zero = (x == 0).all(dim=2).all(dim=1)  # [layer, d]: read 0 on every image and position
        assert torch.equal(zero, ~keep)


def test_random_baseline_draws_the_selective_per_layer_counts():
    classifier = image_classifier(_vit())
    selective, _, _ = _run(classifier, _cfg())
    counts = [(r.ff_per_layer, r.attn_per_layer) for r in selective.history if r.step > 0]
    random_run, masks, _ = _run(classifier, _cfg(random_baseline=True), PruneOptions(random_counts=counts))
    assert [r.step for r in random_run.history] == [0, 1, 2]
    for step in (1, 2):
        before, after = masks[step - 1], masks[step]
        new_ff = (before.ff_keep & ~after.ff_keep).sum(dim=1).tolist()  # [layer]
        new_attn = (before.attn_keep & ~after.attn_keep).sum(dim=1).tolist()
        assert (new_ff, new_attn) == counts[step - 1]
    assert not torch.equal(random_run.mask.ff_keep, selective.mask.ff_keep)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(budget=BudgetConfig(max_retain_drop=0.05)), "budget"),
        (dict(ff_scoring="taylor"), "gradient"),
    ],
    ids=["budget", "taylor"],
)
def test_unsupported_image_settings_fail_before_any_work(overrides, message):
    classifier = image_classifier(_vit())
    images = _images()
    with pytest.raises(ConfigError, match=message):
        ImageMeasure(classifier, _cfg(**overrides), (images, images), {"forget": images})
