"""The digits bench's paired comparison: a random run that prunes nothing new separates by 0, and the
selective-minus-random difference and its interval are read off the same resampled images."""

from __future__ import annotations

import pytest
import torch

from bench.vit_digits import _separation, compare
from selprune_core.image_measure import image_classifier
from selprune_core.masks import NeuronMask
from tests.unit.core.test_image_measure import _images, _vit


def test_separation_is_forget_drop_minus_retain_drop():
    base = {"forget": torch.tensor([1.0]), "retain": torch.tensor([0.8])}
    now = {"forget": torch.tensor([0.25]), "retain": torch.tensor([0.6])}
    assert float(_separation(base, now)) == pytest.approx(0.75 - 0.25)


def test_identical_masks_compare_equal_with_a_zero_interval():
    classifier = image_classifier(_vit())
    images = _images()
    sets = {"forget": images.with_labels([0, 1, 2]), "retain": images.without_labels([0, 1, 2])}
    full = NeuronMask.full(classifier.sites, classifier.fingerprint)
    g = torch.Generator().manual_seed(0)
    pruned = full.prune(torch.rand(full.ff_keep.shape, generator=g) < 0.5, torch.zeros_like(full.attn_keep))
    rows = compare(classifier, sets, [full, pruned], [[full, pruned], [full, pruned]], n_samples=200)
    assert len(rows) == 1
    assert rows[0]["difference"] == pytest.approx(0.0) and rows[0]["difference_ci"] == pytest.approx(
        [0.0, 0.0]
    )
    unpruned = compare(classifier, sets, [full, pruned], [[full, full]], n_samples=200)[0]
    assert unpruned["random_separation"] == pytest.approx(0.0)
    assert unpruned["difference"] == pytest.approx(unpruned["selective_separation"])
