"""Every listed family: a folded mask exports a checkpoint that transformers reloads with the hooked
logits; mixture-of-experts families are refused with the reason; a model without the common layout
gets an error naming what was looked for. (Statistics, mask-vs-zeroed-weights and mid-flight decoding
run over the same families in test_activations, test_masks and test_decoding.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from selprune_core.errors import UnsupportedArchitectureError
from selprune_core.families import FAMILIES, REFUSED_FAMILIES, build_tiny, describe_family
from selprune_core.masking import apply_mask, fold_into_weights
from selprune_core.masks import NeuronMask
from selprune_core.sites import ModelSites, model_fingerprint, resolve_sites
from tests.helpers import ARCHS, CORPUS


def _mask(model, sites: ModelSites, seed: int = 0) -> NeuronMask:
    """A random mask, with mean-ablation offsets on each site kind that can hold a folded bias."""
    g = torch.Generator().manual_seed(seed)
    ff = torch.rand(sites.n_layers, sites.d_mlp, generator=g) > 0.3
    attn = torch.rand(sites.n_layers, sites.d_attn, generator=g) > 0.3
    ff_offset = torch.randn(ff.shape, generator=g) if sites.can_hold_bias(sites.ff_modules[0]) else None
    attn_offset = torch.randn(attn.shape, generator=g) if sites.can_hold_bias(sites.attn_modules[0]) else None
    return NeuronMask(model_fingerprint(model), ff, attn, sites.n_heads, ff_offset, attn_offset)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_export_reloads_with_the_hooked_logits(tiny_model, tokenizer, arch, tmp_path):
    model = tiny_model(arch)
    sites = resolve_sites(model)
    mask = _mask(model, sites)
    enc = tokenizer(CORPUS[:3], return_tensors="pt", padding=True)
    with apply_mask(model, sites, mask):
        hooked = model(**enc).logits  # [batch, pos, vocab]
    fold_into_weights(model, sites, mask)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    logits = reloaded.eval()(**enc).logits
    valid = enc["attention_mask"].bool()  # padded positions may differ (their attention rows are empty)
    torch.testing.assert_close(logits[valid], hooked[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_report_matches_the_sites(family):
    if not family.available:
        pytest.skip(f"transformers has no {family.model_type}")
    report = describe_family(family)
    sites = resolve_sites(build_tiny(family, vocab_size=64))
    assert report.ff_site.format(i=1).endswith(sites.spec.ff_out)
    named = dict(build_tiny(family, vocab_size=64).named_modules())
    assert report.ff_site.format(i=1) in named and report.attn_site.format(i=1) in named


@pytest.mark.parametrize("family", REFUSED_FAMILIES, ids=lambda f: f.model_type)
def test_mixture_of_experts_is_refused_with_the_reason(family):
    if not family.available:
        pytest.skip(f"transformers has no {family.model_type}")
    model = build_tiny(family, vocab_size=64)
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts.*per-expert token counts"):
        resolve_sites(model)


def test_a_model_without_the_common_layout_gets_what_was_looked_for(tiny_model):
    model = tiny_model("llama")
    for layer in model.model.layers:  # an attention block whose output projection has another name
        layer.self_attn.output_mixer = layer.self_attn.o_proj
        del layer.self_attn.o_proj
    with pytest.raises(UnsupportedArchitectureError) as info:
        resolve_sites(model)
    message = str(info.value)
    assert "LlamaForCausalLM" in message and "model.layers.0" in message
    assert "o_proj, out_proj, dense" in message and "writing 32 features" in message
    assert "MLP" not in message  # the MLP was found: only the missing part is named


def test_a_config_without_layers_or_widths_is_refused():
    class Bare(nn.Module):
        config = None

    with pytest.raises(UnsupportedArchitectureError, match="num_hidden_layers and hidden_size"):
        resolve_sites(Bare())


def test_widths_are_checked_against_the_config(tiny_model):
    model = tiny_model("qwen3")
    model.config.head_dim = 16  # the module reads 4 x 8
    with pytest.raises(UnsupportedArchitectureError, match=r"!= num_attention_heads x head_dim \(4 x 16\)"):
        resolve_sites(model)
    model = tiny_model("llama")
    model.config.intermediate_size = 96
    with pytest.raises(UnsupportedArchitectureError, match="reads 64 features, but intermediate_size is 96"):
        resolve_sites(model)
