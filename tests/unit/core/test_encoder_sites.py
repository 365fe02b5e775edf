"""Encoder families (BERT, RoBERTa, ViT), bare and with their task heads: the hook sites are found from
the module structure, a mask equals zeroing the hooked weight columns, a folded mask reloads with the
hooked logits, and statistics equal a direct computation.

BERT and RoBERTa keep the encoder layout (`encoder.layer.{i}.attention.output.dense`, `output.dense`);
transformers 5 rebuilt ViT on the decoder layout (`layers.{i}.attention.o_proj`, `mlp.fc2`), which the
same search finds. The configs live here, not in `selprune_core.families`: FAMILIES is the causal-LM
table that the decoding, generation and export tests build with AutoModelForCausalLM.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    PreTrainedModel,
)

from selprune_core.activations import STAT_FIELDS, ComponentStats, collect_activations, record_activations
from selprune_core.batching import iter_token_batches
from selprune_core.masking import apply_mask, fold_into_weights
from selprune_core.masks import NeuronMask
from selprune_core.sites import ModelSites, model_fingerprint, resolve_sites
from tests.helpers import CORPUS, site_inputs

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
IMAGE = dict(image_size=16, patch_size=4, num_channels=3, num_labels=10)  # 16 patches + CLS = 17 tokens

# (model_type, auto class, expected layer list, FF site, attention site), bare and headed.
CASES = [
    ("bert", AutoModel, "encoder.layer", "output.dense", "attention.output.dense"),
    ("bert", AutoModelForMaskedLM, "bert.encoder.layer", "output.dense", "attention.output.dense"),
    ("roberta", AutoModel, "encoder.layer", "output.dense", "attention.output.dense"),
    ("roberta", AutoModelForMaskedLM, "roberta.encoder.layer", "output.dense", "attention.output.dense"),
    ("vit", AutoModel, "layers", "mlp.fc2", "attention.o_proj"),
    ("vit", AutoModelForImageClassification, "vit.layers", "mlp.fc2", "attention.o_proj"),
]
IDS = [f"{case[0]}-{'bare' if case[1] is AutoModel else 'head'}" for case in CASES]


def _build(model_type: str, auto: Any, vocab_size: int = 100, seed: int = 0) -> PreTrainedModel:
    """A random-init two-layer, 32-wide encoder in eval mode."""
    if model_type == "vit":
        extra: dict[str, Any] = IMAGE
    else:
        # pad 0 / bos 1 / eos 2 as in the test tokenizer: RoBERTa numbers positions after its pad id.
        extra = dict(vocab_size=vocab_size, max_position_embeddings=64, pad_token_id=0)
        extra |= dict(bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(model_type, **TINY, **extra)
    torch.manual_seed(seed)
    model: PreTrainedModel = auto.from_config(config)
    module: torch.nn.Module = model
    module.eval()
    return model


def _inputs(model_type: str) -> dict[str, torch.Tensor]:
    """A batch of 3: token ids [3, 12] with one right-padded row, or random images [3, 3, 16, 16]."""
    g = torch.Generator().manual_seed(0)
    if model_type == "vit":
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=g)}
    ids = torch.randint(3, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[2, 8:], mask[2, 8:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def _output(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's logits, or the bare model's last hidden state."""
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _mask(model: PreTrainedModel, sites: ModelSites, *, offsets: bool, seed: int = 0) -> NeuronMask:
    """About 30% of each layer's neurons pruned; with `offsets`, they output random constants."""
    g = torch.Generator().manual_seed(seed)
    ff = torch.rand(sites.n_layers, sites.d_mlp, generator=g) > 0.3  # [layer, d_mlp]
    attn = torch.rand(sites.n_layers, sites.d_attn, generator=g) > 0.3  # [layer, d_attn]
    ff_offset = torch.randn(ff.shape, generator=g) if offsets else None
    attn_offset = torch.randn(attn.shape, generator=g) if offsets else None
    return NeuronMask(model_fingerprint(model), ff, attn, sites.n_heads, ff_offset, attn_offset)


def _real(out: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Outputs at real positions: padded ones may differ between models (nothing reads them)."""
    mask = inputs.get("attention_mask")
    return out[mask.bool()] if mask is not None else out


@pytest.mark.parametrize("model_type, auto, layers, ff_out, attn_out", CASES, ids=IDS)
def test_sites_are_found_with_their_widths(model_type, auto, layers, ff_out, attn_out):
    model = _build(model_type, auto)
    sites = resolve_sites(model)
    assert sites.spec is not None
    assert (sites.spec.layers, sites.spec.ff_out, sites.spec.attn_out) == (layers, ff_out, attn_out)
    assert (sites.n_layers, sites.d_mlp, sites.d_attn, sites.n_heads, sites.d_head) == (2, 64, 32, 4, 8)
    assert sites.model_type == model_type
    named = dict(model.named_modules())
    for i in range(2):
        assert sites.ff_modules[i] is named[f"{layers}.{i}.{ff_out}"]
        assert sites.attn_modules[i] is named[f"{layers}.{i}.{attn_out}"]
    # Every site already has a bias, so a mean-ablation mask folds without any config flag.
    assert sites.can_hold_bias(sites.ff_modules[0]) and sites.can_hold_bias(sites.attn_modules[0])


@pytest.mark.parametrize("model_type, auto, layers, ff_out, attn_out", CASES, ids=IDS)
def test_fingerprint_is_dtype_independent_and_weight_sensitive(model_type, auto, layers, ff_out, attn_out):
    model = _build(model_type, auto)
    fp = model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fp
    assert model_fingerprint(copy.deepcopy(model).to(torch.float16)) == fp
    assert model_fingerprint(_build(model_type, auto, seed=1)) != fp


@torch.no_grad()
@pytest.mark.parametrize("model_type, auto, layers, ff_out, attn_out", CASES, ids=IDS)
def test_mask_equals_zeroed_weight_columns(model_type, auto, layers, ff_out, attn_out):
    model = _build(model_type, auto)
    sites = resolve_sites(model)
    mask = _mask(model, sites, offsets=False)
    inputs = _inputs(model_type)
    before = _output(model, inputs)
    with apply_mask(model, sites, mask, fingerprint=mask.fingerprint):
        hooked = _output(model, inputs)
    assert torch.equal(_output(model, inputs), before)  # hooks removed on exit
    assert (hooked - before).abs().max() > 1e-4  # the mask did something
    # Zero the columns by module name, not through `sites`, so a wrong site would show here.
    zeroed = copy.deepcopy(model)
    for i in range(sites.n_layers):
        for path, keep in ((ff_out, mask.ff_keep[i]), (attn_out, mask.attn_keep[i])):
            weight = zeroed.get_submodule(f"{layers}.{i}.{path}").weight  # [out, in]: inputs are columns
            weight[:, ~keep] = 0.0
    masked = _output(zeroed, inputs)
    torch.testing.assert_close(_real(masked, inputs), _real(hooked, inputs), rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("offsets", [False, True], ids=["zero", "mean"])
@pytest.mark.parametrize("model_type, auto, layers, ff_out, attn_out", CASES, ids=IDS)
def test_fold_save_and_reload_give_the_hooked_outputs(
    model_type, auto, layers, ff_out, attn_out, offsets, tmp_path
):
    model = _build(model_type, auto)
    sites = resolve_sites(model)
    mask = _mask(model, sites, offsets=offsets)
    inputs = _inputs(model_type)
    with apply_mask(model, sites, mask):
        hooked = _output(model, inputs)
    if offsets:  # the offsets do something beyond zero ablation
        zero = NeuronMask(mask.fingerprint, mask.ff_keep, mask.attn_keep, mask.n_heads)
        with apply_mask(model, sites, zero):
            assert (_output(model, inputs) - hooked).abs().max() > 1e-3
    fold_into_weights(model, sites, mask, fingerprint=model_fingerprint(model))
    model.save_pretrained(tmp_path)
    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    logits = _output(reloaded.eval(), inputs)
    torch.testing.assert_close(_real(logits, inputs), _real(hooked, inputs), rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("model_type, auto", [("bert", AutoModelForMaskedLM), ("vit", AutoModel)])
def test_per_row_masks_match_each_row_alone(model_type, auto):
    model = _build(model_type, auto)
    sites = resolve_sites(model)
    rows = [_mask(model, sites, offsets=True, seed=1), _mask(model, sites, offsets=False, seed=2)]
    rows.append(NeuronMask.full(sites, rows[0].fingerprint))
    inputs = _inputs(model_type)
    with apply_mask(model, sites, rows):
        mixed = _output(model, inputs)
    for i, row in enumerate(rows):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        with apply_mask(model, sites, row):
            alone = _output(model, one)
        torch.testing.assert_close(_real(mixed[i : i + 1], one), _real(alone, one), rtol=1e-4, atol=1e-4)


# Statistics ------------------------------------------------------------------------------------------


def _captured(sites: ModelSites, run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Every hooked input of `run`'s forwards: [layer, tokens, d] float64."""
    return site_inputs(sites, run, flatten=True)


def _assert_stats_equal(got: ComponentStats, x: torch.Tensor) -> None:
    """`got` against the sums of x [layer, tokens, d] computed directly."""
    assert got.n == x.shape[1]
    expected = {
        "sum": x.sum(1),
        "sum_sq": (x * x).sum(1),
        "sum_abs": x.abs().sum(1),
        "sum_sqrt": x.abs().sqrt().sum(1),
        "pos_count": (x > 0).double().sum(1),
    }
    for name in STAT_FIELDS:
        torch.testing.assert_close(getattr(got, name), expected[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_text_encoder_stats_equal_direct_computation(tokenizer, model_type):
    """The causal-LM collector runs as is on a text encoder: padded batches through the bare body."""
    model = _build(model_type, AutoModelForMaskedLM, vocab_size=len(tokenizer))
    sites = resolve_sites(model)
    batches = iter_token_batches(tokenizer, CORPUS, token_limit=60, batch_size=3)
    stats = collect_activations(model, sites, batches, sample_tokens=10**9)

    def one_text_at_a_time() -> None:  # batch 1, no padding
        for text in CORPUS:
            model(input_ids=tokenizer(text, return_tensors="pt")["input_ids"][:, :60])

    direct = _captured(sites, one_text_at_a_time)
    _assert_stats_equal(stats.ff, direct["ff"])
    _assert_stats_equal(stats.attn, direct["attn"])


@torch.no_grad()
@pytest.mark.parametrize("auto", [AutoModel, AutoModelForImageClassification], ids=["bare", "head"])
def test_vit_stats_from_the_recording_hooks_equal_direct_computation(auto):
    """`collect_activations` takes token batches; the recording hooks under it take any forward."""
    model = _build("vit", auto)
    sites = resolve_sites(model)
    pixels = _inputs("vit")["pixel_values"]  # [batch, 3, 16, 16] -> 17 tokens per image
    ff = ComponentStats.zeros(sites.n_layers, sites.d_mlp, STAT_FIELDS, torch.device("cpu"))
    attn = ComponentStats.zeros(sites.n_layers, sites.d_attn, STAT_FIELDS, torch.device("cpu"))
    with record_activations(sites, ff, attn) as recorders:
        for recorder in recorders:  # every token of every image counts: [batch * pos]
            recorder.token_weight = torch.ones(pixels.shape[0] * 17, dtype=torch.float64)
        model(pixel_values=pixels)
    ff.n = attn.n = pixels.shape[0] * 17
    direct = _captured(sites, lambda: model(pixel_values=pixels))
    _assert_stats_equal(ff, direct["ff"])
    _assert_stats_equal(attn, direct["attn"])
