"""The digits splits and the cached digits ViT: stratified deterministic splits normalised with train
statistics; training is bit-for-bit repeatable and the cache is reused until the recipe changes.

Training here is cut to a few steps of a 16-wide, one-layer ViT (a couple of seconds)."""

from __future__ import annotations

import dataclasses
import json

import torch

from selprune_core.images import DigitsSplitConfig, load_digits_splits
from selprune_core.vision_model import (
    TRAINING_FILE,
    VitRecipe,
    ensure_digits_vit,
    load_digits_vit,
    recipe_key,
    train_vit,
)

TINY = VitRecipe(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_steps=3
)


def test_digits_splits_are_stratified_disjoint_and_deterministic():
    splits = load_digits_splits()
    again = load_digits_splits()
    assert torch.equal(splits.heldout.pixels, again.heldout.pixels)
    assert torch.equal(splits.train.labels, again.train.labels)
    sizes = {name: len(splits.split(name)) for name in ("train", "validation", "heldout")}
    assert sum(sizes.values()) == 1797 and splits.n_classes == 10
    assert splits.train.pixels.shape[1:] == (1, 8, 8) and splits.train.pixels.dtype == torch.float32
    # Stratified: every class holds ~30% of its images out, and ~15% of the rest for validation.
    total = torch.tensor(splits.train.counts(10)) + torch.tensor(splits.validation.counts(10))
    total += torch.tensor(splits.heldout.counts(10))
    assert ((torch.tensor(splits.heldout.counts(10)) - 0.3 * total).abs() <= 0.5).all()
    # Disjoint: no image (as raw pixels) appears in two splits.
    rows = {name: {tuple(p.flatten().tolist()) for p in splits.split(name).pixels} for name in sizes}
    assert not rows["train"] & rows["heldout"] and not rows["validation"] & rows["heldout"]
    # Normalised with the train statistics.
    assert abs(float(splits.train.pixels.mean())) < 1e-4 and abs(float(splits.train.pixels.std()) - 1) < 1e-3
    rgb = load_digits_splits(DigitsSplitConfig(channels=3))
    assert torch.equal(rgb.heldout.pixels[:, 2], splits.heldout.pixels[:, 0])


def test_label_filters_split_forget_from_retain():
    heldout = load_digits_splits().heldout
    forget, retain = heldout.with_labels([3]), heldout.without_labels([3])
    assert set(forget.labels.tolist()) == {3} and 3 not in retain.labels.tolist()
    assert len(forget) + len(retain) == len(heldout)


def test_training_twice_with_one_seed_gives_identical_weights():
    splits = load_digits_splits()
    first = train_vit(TINY, splits.train, 10).state_dict()
    second = train_vit(TINY, splits.train, 10).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = train_vit(dataclasses.replace(TINY, seed=1), splits.train, 10).state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_cache_is_reused_and_a_changed_recipe_retrains(tmp_path):
    folder = ensure_digits_vit(tmp_path, TINY)
    assert folder == tmp_path / "models" / "vit-digits"
    info = json.loads((folder / TRAINING_FILE).read_text())
    assert info["key"] == recipe_key(TINY) and set(info["accuracy"]) == {"train", "validation", "heldout"}
    weights = next(folder.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert ensure_digits_vit(tmp_path, TINY) == folder
    assert weights.stat().st_mtime_ns == stamp  # not retrained
    classifier, loaded_info = load_digits_vit(folder)
    assert loaded_info == info and classifier.n_classes == 10 and classifier.sites.d_mlp == 32
    changed = dataclasses.replace(TINY, max_steps=4)
    assert recipe_key(changed) != recipe_key(TINY)
    ensure_digits_vit(tmp_path, changed)
    assert json.loads((folder / TRAINING_FILE).read_text())["key"] == recipe_key(changed)
