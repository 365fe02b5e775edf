from __future__ import annotations

import copy
import threading

import pytest
import torch
from safetensors.torch import load
from transformers import AutoModelForCausalLM

from selprune_core.activations import ComponentStats, record_activations
from selprune_core.errors import MaskMismatchError, UnsupportedArchitectureError
from selprune_core.families import describe_family
from selprune_core.masking import apply_mask, fold_into_weights
from selprune_core.masks import NeuronMask
from selprune_core.sites import model_fingerprint, resolve_sites
from tests.helpers import ARCHS, CORPUS, FAMILY_BY_TYPE


def _random_mask(model, frac=0.3, seed=0):
    sites = resolve_sites(model)
    g = torch.Generator().manual_seed(seed)
    ff = torch.rand(sites.n_layers, sites.d_mlp, generator=g) > frac
    attn = torch.rand(sites.n_layers, sites.d_attn, generator=g) > frac
    return sites, NeuronMask(model_fingerprint(model), ff, attn, sites.n_heads)


def _offset_mask(model, *, ff=True, attn=True, frac=0.3, seed=0):
    """A random mask whose pruned neurons output random constants (mean ablation) on ff and/or attn."""
    sites, mask = _random_mask(model, frac, seed)
    g = torch.Generator().manual_seed(seed + 100)
    ff_offset = torch.randn(mask.ff_keep.shape, generator=g) if ff else None  # [layer, d_mlp]
    attn_offset = torch.randn(mask.attn_keep.shape, generator=g) if attn else None  # [layer, d_attn]
    return sites, NeuronMask(
        mask.fingerprint, mask.ff_keep, mask.attn_keep, mask.n_heads, ff_offset, attn_offset
    )


# Which hooked projections can hold a folded offset: (FF output projection, attention output
# projection), written out by hand from each family's modeling code. Biases already there: gpt2, opt,
# gpt_neox, bloom, phi, starcoder2 (and gptj/codegen on fc_out only). Config flags that build them:
# mlp_bias (llama, granite, smollm3) and attention_bias (also gemma*, qwen3, olmo*). Hard-coded
# bias=False: mistral, qwen2, phi3, stablelm; falcon's one `bias` flag covers the whole model.
FOLDS_OFFSETS = {
    "llama": (True, True),
    "mistral": (False, False),
    "qwen2": (False, False),
    "qwen3": (False, True),
    "gemma": (False, True),
    "gemma2": (False, True),
    "gemma3_text": (False, True),
    "phi3": (False, False),
    "phi": (True, True),
    "olmo": (False, True),
    "olmo2": (False, True),
    "granite": (True, True),
    "stablelm": (False, False),
    "smollm3": (True, True),
    "starcoder2": (True, True),
    "falcon": (False, False),
    "gpt2": (True, True),
    "gptj": (True, False),
    "codegen": (True, False),
    "bloom": (True, True),
    "opt": (True, True),
    "gpt_neox": (True, True),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_family_report_says_which_offsets_fold(arch):
    report = describe_family(FAMILY_BY_TYPE[arch])
    assert report.exports_offsets == FOLDS_OFFSETS[arch]


def _batch(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_mask_equals_weight_zeroing_and_exit_restores(tiny_model, tokenizer, arch):
    model = tiny_model(arch)
    sites, mask = _random_mask(model)
    ids, attn = _batch(tokenizer, CORPUS[:4])
    before = model(input_ids=ids, attention_mask=attn).logits
    with apply_mask(model, sites, mask, fingerprint=mask.fingerprint):
        masked = model(input_ids=ids, attention_mask=attn).logits
    after = model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(before, after)  # hooks gone, logits restored exactly
    assert (masked - before).abs().max() > 1e-4  # the mask did something
    fold_into_weights(model, sites, mask)
    folded = model(input_ids=ids, attention_mask=attn).logits
    assert (folded - masked).abs().max().item() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox"])
def test_per_row_masks_match_each_row_alone(tiny_model, tokenizer, arch):
    model = tiny_model(arch)
    sites, m1 = _random_mask(model, seed=1)
    _, m2 = _random_mask(model, seed=2)
    full = NeuronMask.full(sites, m1.fingerprint)
    rows = [m1, m2, full]
    ids, attn = _batch(tokenizer, CORPUS[:3])
    with apply_mask(model, sites, rows):
        mixed = model(input_ids=ids, attention_mask=attn).logits
    for i, m in enumerate(rows):
        with apply_mask(model, sites, m):
            alone = model(input_ids=ids[i : i + 1], attention_mask=attn[i : i + 1]).logits
        valid = attn[i].bool()
        torch.testing.assert_close(mixed[i][valid], alone[0][valid], rtol=1e-4, atol=1e-4)


def test_id_is_content_addressed_and_roundtrips(tiny_model, tmp_path):
    model = tiny_model("llama")
    sites, mask = _random_mask(model)
    same = NeuronMask(mask.fingerprint, mask.ff_keep.clone(), mask.attn_keep.clone(), mask.n_heads)
    assert same.mask_id == mask.mask_id and same == mask
    flipped = mask.ff_keep.clone()
    flipped[0, 0] = ~flipped[0, 0]
    assert NeuronMask(mask.fingerprint, flipped, mask.attn_keep, mask.n_heads).mask_id != mask.mask_id
    assert NeuronMask("other", mask.ff_keep, mask.attn_keep, mask.n_heads).mask_id != mask.mask_id
    path = mask.save(tmp_path, {"name": "demo"})
    loaded = NeuronMask.load(path)
    assert loaded.mask_id == mask.mask_id and torch.equal(loaded.attn_keep, mask.attn_keep)
    assert (tmp_path / f"{mask.mask_id}.json").exists()
    assert NeuronMask.from_bytes(mask.to_bytes()).mask_id == mask.mask_id
    # Packed bits: one bit per neuron, in memory and in the stored file (plus a small header).
    n_bits = mask.ff_keep.numel() + mask.attn_keep.numel()
    assert len(mask.packed_bits()) == (n_bits + 7) // 8
    assert len(mask.to_bytes()) < n_bits // 8 + 1024


def test_union_intersection_and_counts(tiny_model):
    model = tiny_model("gpt2")
    sites, a = _random_mask(model, seed=1)
    _, b = _random_mask(model, seed=2)
    union, inter = a.union(b), a.intersection(b)
    assert torch.equal(~union.ff_keep, ~a.ff_keep | ~b.ff_keep)
    assert torch.equal(~inter.attn_keep, ~a.attn_keep & ~b.attn_keep)
    counts = union.pruned_counts()
    assert counts["ff"] == int((~union.ff_keep).sum()) == sum(counts["ff_per_layer"])
    assert counts["ff_total"] == sites.n_layers * sites.d_mlp


def test_mismatch_errors(tiny_model, tokenizer):
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    _, mask = _random_mask(llama)
    with pytest.raises(MaskMismatchError, match="shape"):
        with apply_mask(gpt2, resolve_sites(gpt2), mask):
            pass
    other = tiny_model("llama", seed=5)
    with pytest.raises(MaskMismatchError, match="fingerprint"):
        fold_into_weights(other, resolve_sites(other), mask, fingerprint=model_fingerprint(other))
    _, gmask = _random_mask(gpt2)
    with pytest.raises(MaskMismatchError):
        mask.union(gmask)
    with pytest.raises(MaskMismatchError, match="not a selprune mask"):
        NeuronMask.from_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")


def test_mask_hooks_removed_on_error(tiny_model):
    model = tiny_model("llama")
    sites, mask = _random_mask(model)
    with pytest.raises(RuntimeError), apply_mask(model, sites, mask):
        raise RuntimeError("boom")
    for module in sites.ff_modules + sites.attn_modules:
        assert not module._forward_pre_hooks


@torch.no_grad()
def test_hooks_act_only_in_the_registering_thread(tiny_model, tokenizer):
    """A job thread's mask and statistics hooks must not reach a serving thread's forwards."""
    model = tiny_model("llama")
    sites, mask = _random_mask(model)
    ids, attn = _batch(tokenizer, CORPUS[:2])
    plain = model(input_ids=ids, attention_mask=attn).logits
    cpu = torch.device("cpu")
    stats = ComponentStats.zeros(sites.n_layers, sites.d_mlp, ["sum_abs"], cpu)
    attn_stats = ComponentStats.zeros(sites.n_layers, sites.d_attn, ["sum_abs"], cpu)
    seen: dict[str, torch.Tensor] = {}

    def other_thread() -> None:
        with torch.no_grad():
            seen["logits"] = model(input_ids=ids, attention_mask=attn).logits

    with apply_mask(model, sites, mask), record_activations(sites, stats, attn_stats):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert torch.equal(seen["logits"], plain)
    assert stats.sum_abs is not None and float(stats.sum_abs.abs().sum()) == 0.0


# Mean-ablation offsets ---------------------------------------------------------------------------------


def test_zero_ablation_ids_are_unchanged_by_offsets():
    """Ids of masks saved before offsets existed must stay valid: pinned to the old formula's output."""
    ff = (torch.arange(2 * 64).view(2, 64) % 3) != 0  # [layer, d_mlp]
    attn = (torch.arange(2 * 32).view(2, 32) % 5) != 1  # [layer, d_attn]
    zero = NeuronMask("0123456789abcdef", ff, attn, 4)
    assert zero.mask_id == "48e20a76f4115f510c660e33"  # computed by the pre-offsets NeuronMask
    # Offsets that are all zero, or only on kept neurons, are zero ablation: same mask, same id.
    on_kept = torch.randn(ff.shape).masked_fill(~ff, 0.0)
    assert NeuronMask(zero.fingerprint, ff, attn, 4, torch.zeros(ff.shape), None).mask_id == zero.mask_id
    same = NeuronMask(zero.fingerprint, ff, attn, 4, on_kept, None)
    assert same.mask_id == zero.mask_id and not same.has_offsets
    offset = NeuronMask(zero.fingerprint, ff, attn, 4, torch.randn(ff.shape), None)
    assert offset.has_offsets and offset.mask_id != zero.mask_id


def test_kept_neurons_offsets_are_zeroed_and_do_not_change_the_id(tiny_model):
    model = tiny_model("llama")
    _, mask = _offset_mask(model)
    assert mask.ff_offset is not None and mask.attn_offset is not None
    assert not mask.ff_offset[mask.ff_keep].any() and not mask.attn_offset[mask.attn_keep].any()
    noisy_ff = mask.ff_offset + 5.0 * mask.ff_keep  # garbage on kept neurons only
    noisy_attn = mask.attn_offset - 3.0 * mask.attn_keep
    noisy = NeuronMask(mask.fingerprint, mask.ff_keep, mask.attn_keep, mask.n_heads, noisy_ff, noisy_attn)
    assert noisy.mask_id == mask.mask_id and torch.equal(noisy.ff_offset, mask.ff_offset)
    # Changing one pruned neuron's offset is a different mask.
    pruned = (~mask.ff_keep).nonzero()[0].tolist()
    moved = mask.ff_offset.clone()
    moved[pruned[0], pruned[1]] += 1.0
    other = NeuronMask(mask.fingerprint, mask.ff_keep, mask.attn_keep, mask.n_heads, moved, mask.attn_offset)
    assert other.mask_id != mask.mask_id
    with pytest.raises(MaskMismatchError, match="NaN"):
        NeuronMask(mask.fingerprint, mask.ff_keep, mask.attn_keep, mask.n_heads, moved * float("nan"))


def test_offset_mask_roundtrips_and_stores_only_pruned_offsets(tiny_model, tmp_path):
    model = tiny_model("llama")
    _, mask = _offset_mask(model)
    data = mask.to_bytes({"name": "mean"})
    loaded = NeuronMask.from_bytes(data)
    assert loaded.mask_id == mask.mask_id and loaded.has_offsets
    assert torch.equal(loaded.ff_offset, mask.ff_offset) and torch.equal(loaded.attn_offset, mask.attn_offset)
    assert NeuronMask.load(mask.save(tmp_path)).mask_id == mask.mask_id
    tensors = load(data)
    # One float32 per pruned neuron, in row-major order of the pruned positions.
    assert torch.equal(tensors["ff_offset"], mask.ff_offset[~mask.ff_keep])
    assert torch.equal(tensors["attn_offset"], mask.attn_offset[~mask.attn_keep])
    zero = NeuronMask(mask.fingerprint, mask.ff_keep, mask.attn_keep, mask.n_heads)
    assert set(load(zero.to_bytes())) == {"ff_keep", "attn_keep"}  # zero ablation: no offsets stored
    assert zero.mask_id != mask.mask_id
    # Attention offsets only: the FF list is stored empty and the mask still round-trips.
    attn_only = NeuronMask(
        mask.fingerprint, mask.ff_keep, mask.attn_keep, mask.n_heads, None, mask.attn_offset
    )
    back = NeuronMask.from_bytes(attn_only.to_bytes())
    assert back.mask_id == attn_only.mask_id and back.ff_offset is None
    assert torch.equal(back.attn_offset, mask.attn_offset)


def test_prune_keeps_old_offsets_and_sets_new_ones(tiny_model):
    model = tiny_model("llama")
    sites, mask = _offset_mask(model, attn=False)
    values = torch.full((sites.n_layers, sites.d_mlp), 7.0)  # [layer, d_mlp]
    chosen = torch.ones(sites.n_layers, sites.d_mlp, dtype=torch.bool)  # prune every FF neuron
    no_attn = torch.zeros(sites.n_layers, sites.d_attn, dtype=torch.bool)
    pruned = mask.prune(chosen, no_attn, ff_values=values)
    assert not pruned.ff_keep.any() and torch.equal(pruned.attn_keep, mask.attn_keep)
    expected = torch.where(mask.ff_keep, values, mask.ff_offset)  # already pruned: old offset
    assert torch.equal(pruned.ff_offset, expected) and pruned.attn_offset is None
    assert not mask.prune(chosen, no_attn).ff_offset[mask.ff_keep].any()  # no values: zero ablation


def test_union_and_intersection_keep_the_right_offsets(tiny_model):
    model = tiny_model("gpt2")
    _, a = _offset_mask(model, seed=1)
    _, b = _offset_mask(model, seed=2)
    zero = NeuronMask(b.fingerprint, b.ff_keep, b.attn_keep, b.n_heads)
    union, inter = a.union(b), a.intersection(b)
    # Union: a's offset where a prunes, else b's; 0 where both keep.
    assert torch.equal(union.ff_offset, torch.where(a.ff_keep, b.ff_offset, a.ff_offset))
    assert torch.equal(union.attn_offset, torch.where(a.attn_keep, b.attn_offset, a.attn_offset))
    assert not union.ff_offset[union.ff_keep].any()
    # Intersection: a's offset where both prune, 0 elsewhere.
    assert torch.equal(inter.ff_offset, a.ff_offset.masked_fill(inter.ff_keep, 0.0))
    assert torch.equal(inter.attn_offset, a.attn_offset.masked_fill(inter.attn_keep, 0.0))
    # Order decides only neurons both prune; a zero-ablation operand contributes zeros.
    both = ~a.ff_keep & ~b.ff_keep
    assert torch.equal(b.union(a).ff_offset[both], b.ff_offset[both])
    with_zero = a.union(zero)
    only_zero = a.ff_keep & ~zero.ff_keep
    assert only_zero.any() and not with_zero.ff_offset[only_zero].any()
    assert torch.equal(with_zero.ff_offset[~a.ff_keep], a.ff_offset[~a.ff_keep])
    assert zero.intersection(zero).has_offsets is False


@torch.no_grad()
@pytest.mark.parametrize("arch", [a for a in ARCHS if any(FOLDS_OFFSETS[a])])
def test_offset_mask_equals_its_fold_into_biases(tiny_model, tokenizer, arch):
    model = tiny_model(arch)
    ff, attn = FOLDS_OFFSETS[arch]
    sites, mask = _offset_mask(model, ff=ff, attn=attn)
    zero = NeuronMask(mask.fingerprint, mask.ff_keep, mask.attn_keep, mask.n_heads)
    ids, am = _batch(tokenizer, CORPUS[:3])
    with apply_mask(model, sites, mask):
        hooked = model(input_ids=ids, attention_mask=am).logits  # [batch, pos, vocab]
    with apply_mask(model, sites, zero):
        zeroed = model(input_ids=ids, attention_mask=am).logits
    assert (hooked - zeroed).abs().max() > 1e-3  # the offsets do something
    folded = copy.deepcopy(model)
    fold_into_weights(folded, resolve_sites(folded), mask)
    logits = folded(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(logits, hooked, rtol=0, atol=1e-5)


@torch.no_grad()
def test_llama_fold_creates_biases_that_survive_save_and_reload(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama")
    sites, mask = _offset_mask(model)
    assert sites.ff_modules[0].bias is None and sites.attn_modules[0].bias is None
    ids, am = _batch(tokenizer, CORPUS[:2])
    with apply_mask(model, sites, mask):
        hooked = model(input_ids=ids, attention_mask=am).logits
    fold_into_weights(model, sites, mask)
    assert model.config.mlp_bias and model.config.attention_bias
    # Every Linear of the MLP and attention blocks got a bias (the flags build them all on reload).
    layer = model.model.layers[1]
    for linear in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.self_attn.q_proj, layer.self_attn.k_proj):
        assert linear.bias is not None and not linear.bias.any()
    assert layer.mlp.down_proj.bias.any() and layer.self_attn.o_proj.bias.any()
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    logits = reloaded.eval()(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(logits, hooked, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize(
    "arch, ff, attn",
    [("mistral", True, False), ("mistral", False, True), ("qwen2", True, False), ("gemma", True, False)],
)
def test_fold_refuses_offsets_a_family_cannot_hold_and_changes_nothing(tiny_model, tokenizer, arch, ff, attn):
    model = tiny_model(arch)
    sites, mask = _offset_mask(model, ff=ff, attn=attn)
    part = "MLP down projection" if ff else "attention output projection"
    # gemma can hold attention offsets: give the mask some, in layer 0, before the FF offsets of the
    # last layer, so a fold that failed halfway would already have edited the model.
    if arch == "gemma":
        ff_offset = mask.ff_offset.clone()
        ff_offset[:-1] = 0.0
        attn_offset = torch.randn(mask.attn_keep.shape).masked_fill(mask.attn_keep, 0.0)
        mask = NeuronMask(
            mask.fingerprint, mask.ff_keep, mask.attn_keep, mask.n_heads, ff_offset, attn_offset
        )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = (getattr(model.config, "mlp_bias", None), getattr(model.config, "attention_bias", None))
    with pytest.raises(
        UnsupportedArchitectureError, match=f"{arch!r} has no option for a bias on its {part}"
    ):
        fold_into_weights(model, sites, mask)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert (getattr(model.config, "mlp_bias", None), getattr(model.config, "attention_bias", None)) == flags
    # The same bits without offsets (zero ablation) still fold.
    zero = NeuronMask(mask.fingerprint, mask.ff_keep, mask.attn_keep, mask.n_heads)
    ids, am = _batch(tokenizer, CORPUS[:2])
    with apply_mask(model, sites, zero):
        hooked = model(input_ids=ids, attention_mask=am).logits
    fold_into_weights(model, sites, zero)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=am).logits, hooked, rtol=0, atol=1e-5)
