"""A model spread by a device_map computes what the same model on one device computes: statistics,
masked forwards (one mask and one per row), output norms, fingerprint, generation; export folds a
dispatched model and refuses offloaded weights.

On a CPU-only machine a split looks like accelerate's offload: the layers a map sends to "disk" (or,
with a GPU, to "cpu") keep their parameters on `meta` and are loaded for their own forward by hooks.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from accelerate import dispatch_model
from transformers import AutoModelForCausalLM

from selprune_core.activations import collect_activations
from selprune_core.batching import iter_token_batches
from selprune_core.config import EvalConfig, SamplingConfig
from selprune_core.errors import ConfigError
from selprune_core.evaluation import evaluate_texts
from selprune_core.generation import generate
from selprune_core.loading import load_model
from selprune_core.masking import MaskFactors, apply_mask, apply_row_masks, fold_into_weights
from selprune_core.masks import NeuronMask
from selprune_core.placement import input_device, offloaded_parameters
from selprune_core.sites import model_fingerprint, resolve_sites
from tests.helpers import CORPUS


def _mask(model, seed: int = 0) -> NeuronMask:
    """A random mean-ablation mask (30% pruned, random offsets)."""
    sites = resolve_sites(model)
    g = torch.Generator().manual_seed(seed)
    ff = torch.rand(sites.n_layers, sites.d_mlp, generator=g) > 0.3
    attn = torch.rand(sites.n_layers, sites.d_attn, generator=g) > 0.3
    ff_offset = torch.randn(ff.shape, generator=g)
    attn_offset = torch.randn(attn.shape, generator=g)
    return NeuronMask(model_fingerprint(model), ff, attn, sites.n_heads, ff_offset, attn_offset)


def _batch(tokenizer):
    return next(iter_token_batches(tokenizer, CORPUS[:4], token_limit=32, batch_size=4))


def _layer_map(model, where: dict[int, str]) -> dict[str, str]:
    """A device_map of `model`'s modules: layer i on where[i] (default cpu), everything else on cpu."""
    body = model.model
    placed = {f"model.{name}": "cpu" for name, _ in body.named_children() if name != "layers"}
    placed |= {f"model.layers.{i}": where.get(i, "cpu") for i in range(len(body.layers))}
    return placed | {"lm_head": "cpu"}


@pytest.fixture
def single(model_dir: Path, tmp_path: Path):
    return load_model(str(model_dir), cache_dir=tmp_path, device="cpu", dtype="float32")


@pytest.fixture
def offloaded(model_dir: Path, tmp_path: Path):
    """load_model's own device_map path: no room anywhere, so accelerate offloads the whole model to disk."""
    return load_model(
        str(model_dir), cache_dir=tmp_path, dtype="float32", device_map="auto", max_memory="cpu=1"
    )


@pytest.fixture
def split(model_dir: Path, single):
    """Layer 0 (and the embeddings) in memory, layer 1 offloaded to disk."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, device_map=_layer_map(single.model, {1: "disk"})
    )
    return model.eval().requires_grad_(False)


def test_load_with_a_device_map_keeps_the_models_identity(single, offloaded):
    assert offloaded.device_map == {"": "disk"}
    assert offloaded.device == torch.device("cpu") == input_device(offloaded.model)
    assert offloaded_parameters(offloaded.model)  # really offloaded: parameters on meta
    assert offloaded.fingerprint == single.fingerprint  # read from the offloaded copies
    for ours, theirs in zip(offloaded.sites.output_norms(), single.sites.output_norms(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    batch = _batch(single.tokenizer)
    with torch.no_grad():
        want = single.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got = offloaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_max_memory_needs_a_device_map_and_gguf_refuses_one(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="set device_map too"):
        load_model(str(model_dir), cache_dir=tmp_path, device="cpu", max_memory="cpu=1GB")
    with pytest.raises(ConfigError, match="unknown device_map"):
        load_model(str(model_dir), cache_dir=tmp_path, device_map="everywhere")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="loads onto one device"):
        load_model(str(gguf), cache_dir=tmp_path, device_map="auto")


@torch.no_grad()
@pytest.mark.parametrize("layout", ["split", "offloaded"])
def test_masked_forward_matches_one_device(single, request, layout):
    spread = request.getfixturevalue(layout)
    model = spread if layout == "split" else spread.model
    sites = resolve_sites(model)
    batch = _batch(single.tokenizer)
    masks = [_mask(single.model, seed) for seed in range(len(batch.text_index))]
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with apply_mask(single.model, single.sites, masks[0]):
        want_one = single.model(**inputs).logits
    with apply_mask(model, sites, masks[0]):
        got_one = model(**inputs).logits
    torch.testing.assert_close(got_one, want_one, rtol=0, atol=1e-5)
    # One mask per row, through factors reused over two forwards (as the serving lane reuses them).
    factors = MaskFactors.of(masks, input_device(model), torch.float32)
    with apply_row_masks(single.sites, MaskFactors.of(masks, torch.device("cpu"), torch.float32)):
        want_rows = single.model(**inputs).logits
    for _ in range(2):
        with apply_row_masks(sites, factors):
            got_rows = model(**inputs).logits
        torch.testing.assert_close(got_rows, want_rows, rtol=0, atol=1e-5)


def _stats(model, sites, tokenizer):
    batches = iter_token_batches(tokenizer, CORPUS, token_limit=32, batch_size=3, device=input_device(model))
    return collect_activations(model, sites, batches, sample_tokens=10_000)


def _assert_same_stats(got, want):
    assert (got.n_tokens, got.n_texts) == (want.n_tokens, want.n_texts)
    for ours, theirs in ((got.ff, want.ff), (got.attn, want.attn)):
        for name in ("sum", "sum_sq", "sum_abs", "sum_sqrt", "pos_count"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-6, atol=1e-6)


def test_statistics_match_one_device_on_a_split_model(single, split):
    _assert_same_stats(
        _stats(split, resolve_sites(split), single.tokenizer),
        _stats(single.model, single.sites, single.tokenizer),
    )


def test_statistics_match_one_device_when_the_embeddings_are_offloaded(single, offloaded):
    _assert_same_stats(
        _stats(offloaded.model, offloaded.sites, offloaded.tokenizer),
        _stats(single.model, single.sites, single.tokenizer),
    )


def test_evaluation_matches_one_device_when_the_embeddings_are_offloaded(single, offloaded):
    cfg = EvalConfig(token_limit=32, sample_tokens=10_000, batch_size=3, bootstrap_samples=0, skip_common=0)
    want = evaluate_texts(single.model, single.tokenizer, CORPUS, cfg)
    got = evaluate_texts(offloaded.model, offloaded.tokenizer, CORPUS, cfg)
    assert got.n_tokens == want.n_tokens
    assert got.loss == pytest.approx(want.loss, rel=1e-5) and got.top1 == want.top1


def test_greedy_generation_matches_one_device(single, offloaded):
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    mask = _mask(single.model)
    with apply_mask(single.model, single.sites, mask):
        want = generate(single.model, single.tokenizer, CORPUS[:2], cfg)
    with apply_mask(offloaded.model, offloaded.sites, mask):
        got = generate(offloaded.model, offloaded.tokenizer, CORPUS[:2], cfg)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]


def test_export_refuses_offloaded_weights_and_changes_nothing(offloaded):
    mask = _mask(offloaded.model)
    before = {name: p.device for name, p in offloaded.model.named_parameters()}
    with pytest.raises(ConfigError, match="offloaded .* parameters"):
        fold_into_weights(offloaded.model, offloaded.sites, mask)
    assert {name: p.device for name, p in offloaded.model.named_parameters()} == before
    assert offloaded.sites.ff_modules[0].bias is None


@torch.no_grad()
def test_export_of_a_dispatched_model_reloads_with_the_masked_logits(single, tmp_path):
    """A model placed module by module (hooks, weights in memory) folds on each module's device, as
    run_export does it: into a deep copy, saved and reloaded."""
    model = copy.deepcopy(single.model)
    dispatch_model(model, device_map=_layer_map(model, {}), main_device="cpu", force_hooks=True)
    assert hasattr(model.model.layers[1], "_hf_hook")
    mask = _mask(single.model)
    batch = _batch(single.tokenizer)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with apply_mask(single.model, single.sites, mask):
        want = single.model(**inputs).logits
    exported = copy.deepcopy(model)
    fold_into_weights(exported, resolve_sites(exported), mask)
    exported.save_pretrained(tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(reloaded(**inputs).logits, want, rtol=0, atol=1e-5)
