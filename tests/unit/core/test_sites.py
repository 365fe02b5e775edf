from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from selprune_core.errors import UnsupportedArchitectureError
from selprune_core.sites import model_fingerprint, resolve_sites
from tests.helpers import ARCHS, TINY_CONFIGS


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_take_widths_from_modules(tiny_model, arch):
    model = tiny_model(arch)
    sites = resolve_sites(model)
    assert sites.n_layers == 2
    assert sites.d_mlp == (128 if arch == "gpt2" else 64)  # gpt2's MLP is 4 x n_embd
    assert sites.n_heads == 4
    # gemma: 4 heads x 16 dims = 64 != hidden 32; everyone else 4 x 8.
    assert sites.d_head == (16 if arch == "gemma" else 8)
    assert len(sites.attn_modules) == len(sites.ff_modules) == 2


def test_unknown_architecture_names_class_and_supported(tokenizer):
    config = AutoConfig.for_model("bloom", vocab_size=len(tokenizer), hidden_size=32, n_layer=1, n_head=4)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match="BloomForCausalLM.*llama"):
        resolve_sites(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fingerprint_is_dtype_independent_and_weight_sensitive(tiny_model, arch):
    model = tiny_model(arch)
    fp = model_fingerprint(model)
    assert model_fingerprint(model.to(torch.bfloat16)) == fp
    assert model_fingerprint(model.to(torch.float16)) == fp
    assert model_fingerprint(tiny_model(arch, seed=1)) != fp


def test_tiny_configs_cover_every_family():
    from selprune_core.sites import ARCHITECTURES

    families = {spec for spec in ARCHITECTURES}
    assert set(TINY_CONFIGS) <= families
    assert {"llama", "gpt2", "opt", "gpt_neox", "gemma"} <= set(TINY_CONFIGS)
