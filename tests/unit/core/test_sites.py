from __future__ import annotations

import pytest
import torch

from selprune_core.families import FAMILIES
from selprune_core.sites import model_fingerprint, resolve_sites
from tests.helpers import ARCHS

# MLP width 4 x hidden where the family has no intermediate_size; heads x head_dim 4 x 16 for Gemma.
WIDE_MLP = {"gpt2", "gptj", "codegen", "bloom", "falcon"}
WIDE_HEADS = {"gemma", "gemma2", "gemma3_text"}


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_take_widths_from_modules(tiny_model, arch):
    model = tiny_model(arch)
    sites = resolve_sites(model)
    assert sites.n_layers == 2
    assert sites.d_mlp == (128 if arch in WIDE_MLP else 64)
    assert sites.n_heads == 4
    assert sites.d_head == (16 if arch in WIDE_HEADS else 8)  # 64 != hidden 32 for Gemma
    assert len(sites.attn_modules) == len(sites.ff_modules) == 2
    assert sites.ff_modules[1] is not sites.ff_modules[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fingerprint_is_dtype_independent_and_weight_sensitive(tiny_model, arch):
    model = tiny_model(arch)
    fp = model_fingerprint(model)
    assert model_fingerprint(model.to(torch.bfloat16)) == fp
    assert model_fingerprint(model.to(torch.float16)) == fp
    assert model_fingerprint(tiny_model(arch, seed=1)) != fp


def test_tests_build_every_listed_family_transformers_has():
    assert set(ARCHS) == {f.model_type for f in FAMILIES if f.available}
    assert {"llama", "gpt2", "opt", "gpt_neox", "gemma", "gemma3_text", "phi3"} <= set(ARCHS)
