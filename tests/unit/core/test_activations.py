from __future__ import annotations

import pytest
import torch

from selprune_core.activations import STAT_FIELDS, collect_activations, record_activations
from selprune_core.batching import iter_packed_batches, iter_token_batches
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.sites import model_fingerprint, resolve_sites
from tests.helpers import ARCHS, CORPUS


def _direct(model, sites, tokenizer, texts, *, skip_first=0, ids_list=None):
    """Capture hook inputs one text at a time (batch 1, no padding) and compute the sums with torch.

    OPT flattens [batch, pos] before its MLP, so inputs are reshaped to [tokens, d] either way.
    """
    captured = {"ff": [[] for _ in range(sites.n_layers)], "attn": [[] for _ in range(sites.n_layers)]}
    handles = []
    for kind, modules in (("ff", sites.ff_modules), ("attn", sites.attn_modules)):
        for layer, module in enumerate(modules):
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args, kind=kind, layer=layer: captured[kind][layer].append(
                        args[0].reshape(-1, args[0].shape[-1]).double()
                    )
                )
            )
    try:
        with torch.no_grad():
            for ids in ids_list or [tokenizer(text, return_tensors="pt")["input_ids"] for text in texts]:
                model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for kind in ("ff", "attn"):
        xs = [torch.cat([t[skip_first:] for t in captured[kind][layer]]) for layer in range(sites.n_layers)]
        x = torch.stack(xs)  # [layer, tokens, d]
        out[kind] = {
            "n": x.shape[1],
            "sum": x.sum(1),
            "sum_sq": (x * x).sum(1),
            "sum_abs": x.abs().sum(1),
            "sum_sqrt": x.abs().sqrt().sum(1),
            "pos_count": (x > 0).double().sum(1),
        }
    return out


def _collect(model, sites, tokenizer, texts, batch_size=3, **kw):
    batches = iter_token_batches(tokenizer, texts, token_limit=1000, batch_size=batch_size)
    return collect_activations(model, sites, batches, sample_tokens=kw.pop("sample_tokens", 10**9), **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_stats_equal_direct_computation(tiny_model, tokenizer, arch):
    model = tiny_model(arch)
    sites = resolve_sites(model)
    stats = _collect(model, sites, tokenizer, CORPUS)  # padded batches of 3 texts of unequal length
    expected = _direct(model, sites, tokenizer, CORPUS)
    for kind in ("ff", "attn"):
        got = getattr(stats, kind)
        assert got.n == expected[kind]["n"]
        for name in STAT_FIELDS:
            torch.testing.assert_close(getattr(got, name), expected[kind][name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("skip", [1, 3])
def test_skip_first_positions(tiny_model, tokenizer, skip):
    model = tiny_model("llama")
    sites = resolve_sites(model)
    stats = _collect(model, sites, tokenizer, CORPUS, skip_first=skip)
    expected = _direct(model, sites, tokenizer, CORPUS, skip_first=skip)
    assert stats.ff.n == expected["ff"]["n"]
    torch.testing.assert_close(stats.ff.sum_abs, expected["ff"]["sum_abs"], rtol=1e-5, atol=1e-5)


def test_packed_windows_cover_the_stream_and_skip_each_texts_first_positions(tiny_model, tokenizer):
    model = tiny_model("gpt2")
    sites = resolve_sites(model)
    window, skip = 16, 2
    batches = list(iter_packed_batches(tokenizer, CORPUS, token_limit=1000, window=window, batch_size=2))
    stream = [i for text in CORPUS for i in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    assert sum(b.n_tokens for b in batches) == len(stream)
    assert all(b.input_ids.shape[1] == window for b in batches[:-1])  # only the last may be short
    stats = collect_activations(model, sites, iter(batches), sample_tokens=10**9, skip_first=skip)
    # Direct: run each window alone; count a token unless it is among the first `skip` of its window
    # or of its own text.
    windows = [stream[i : i + window] for i in range(0, len(stream), window)]
    positions = [p for text in CORPUS for p in range(len(tokenizer(text)["input_ids"]) + 1)]
    captured = []
    handle = sites.ff_modules[0].register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1]).double())
    )
    try:
        with torch.no_grad():
            for ids in windows:
                model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    x = torch.cat(captured)  # [stream, d_mlp]
    keep = torch.tensor([p >= skip and i % window >= skip for i, p in enumerate(positions)], dtype=torch.bool)
    assert stats.ff.n == int(keep.sum())
    torch.testing.assert_close(stats.ff.sum_abs[0], x[keep].abs().sum(0), rtol=1e-5, atol=1e-5)


def test_merge_equals_single_pass(tiny_model, tokenizer):
    model = tiny_model("gpt2")
    sites = resolve_sites(model)
    first = _collect(model, sites, tokenizer, CORPUS[:3])
    second = _collect(model, sites, tokenizer, CORPUS[3:])
    whole = _collect(model, sites, tokenizer, CORPUS)
    merged = first.merge(second)
    assert merged.n_tokens == whole.n_tokens and merged.n_texts == whole.n_texts == len(CORPUS)
    for name in STAT_FIELDS:
        torch.testing.assert_close(getattr(merged.ff, name), getattr(whole.ff, name))
        torch.testing.assert_close(getattr(merged.attn, name), getattr(whole.attn, name))


def test_budget_stops_after_exceeding(tiny_model, tokenizer):
    model = tiny_model("llama")
    sites = resolve_sites(model)
    texts = CORPUS * 4
    stats = _collect(model, sites, tokenizer, texts, batch_size=2, sample_tokens=30)
    assert stats.ff.n > 30
    assert stats.n_texts < len(texts)
    # The last batch is kept whole: removing it would go back under the budget.
    last_batch = list(iter_token_batches(tokenizer, texts, token_limit=1000, batch_size=2))[
        stats.n_texts // 2 - 1
    ]
    assert stats.ff.n - last_batch.n_tokens <= 30


def test_only_requested_fields_are_collected(tiny_model, tokenizer):
    model = tiny_model("llama")
    sites = resolve_sites(model)
    stats = _collect(model, sites, tokenizer, CORPUS, which=("sum_abs",))
    assert stats.ff.sum_abs is not None and stats.ff.sum_sq is None
    with pytest.raises(ValueError, match="sum_sq"):
        _ = stats.ff.rms


def test_pruned_neurons_read_zero(tiny_model, tokenizer):
    model = tiny_model("llama")
    sites = resolve_sites(model)
    mask = NeuronMask.full(sites, model_fingerprint(model))
    ff_keep, attn_keep = mask.ff_keep.clone(), mask.attn_keep.clone()
    ff_keep[0, :5] = False
    attn_keep[1, 8:16] = False
    mask = NeuronMask(mask.fingerprint, ff_keep, attn_keep, sites.n_heads)
    with apply_mask(model, sites, mask):
        stats = _collect(model, sites, tokenizer, CORPUS)
    assert (stats.ff.sum_abs[0, :5] == 0).all() and (stats.ff.sum_abs[0, 5:] > 0).all()
    assert (stats.attn.sum_abs[1, 8:16] == 0).all() and (stats.attn.sum_abs[1, :8] > 0).all()


def test_mean_ablated_neurons_read_their_offset(tiny_model, tokenizer):
    model = tiny_model("llama")
    sites = resolve_sites(model)
    full = NeuronMask.full(sites, model_fingerprint(model))
    chosen_ff = torch.zeros_like(full.ff_keep)
    chosen_ff[0, :5] = True
    values = torch.full(full.ff_keep.shape, 0.25)
    mask = full.prune(chosen_ff, torch.zeros_like(full.attn_keep), ff_values=values)
    with apply_mask(model, sites, mask):
        stats = _collect(model, sites, tokenizer, CORPUS, which=("sum",))
    torch.testing.assert_close(stats.ff.mean[0, :5], torch.full((5,), 0.25, dtype=torch.float64))


def test_hooks_removed_even_on_error(tiny_model, tokenizer):
    model = tiny_model("llama")
    sites = resolve_sites(model)
    stats = _collect(model, sites, tokenizer, CORPUS[:1])
    bad = torch.full((1, 4), 10**6)  # ids far outside the vocabulary: the embedding raises
    with pytest.raises(IndexError), record_activations(sites, stats.ff, stats.attn) as recorders:
        for recorder in recorders:
            recorder.token_weight = torch.ones(4)
        model(input_ids=bad)
    for module in sites.ff_modules + sites.attn_modules:
        assert not module._forward_pre_hooks


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attribution_rows_equal_autograd(tiny_model, tokenizer, arch):
    """A = sum_t x_t dL/dx_t and B = sum_t dL/dx_t per batch, L the batch's summed next-token CE."""
    model = tiny_model(arch)
    sites = resolve_sites(model)
    texts = CORPUS[:4]
    batches = list(iter_token_batches(tokenizer, texts, token_limit=1000, batch_size=2))
    stats = collect_activations(model, sites, iter(batches), sample_tokens=10**9, which=("attr",))
    assert stats.ff.attr_xg is not None and stats.ff.attr_xg.shape == (2, sites.n_layers, sites.d_mlp)
    assert all(p.grad is None for p in model.parameters())  # the weights' gradients are never computed
    for row, batch in enumerate(batches):
        captured = []

        def keep_grad(_module, args, captured=captured):
            args[0].retain_grad()
            captured.append(args[0])

        handle = sites.ff_modules[1].register_forward_pre_hook(keep_grad)
        try:
            embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
            targets = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum"
            )
            loss.backward()
        finally:
            handle.remove()
        x, g = captured[0].detach().double(), captured[0].grad.double()  # [batch, pos, d_mlp]
        w = batch.attention_mask.double()[..., None]  # padding never counts
        torch.testing.assert_close(stats.ff.attr_xg[row, 1], (w * x * g).sum((0, 1)), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats.ff.attr_g[row, 1], (w * g).sum((0, 1)), rtol=1e-4, atol=1e-6)
    # The estimated loss change of mean ablation: |c * B - A| summed over batches, per counted token.
    center = stats.ff.mean
    expected = (center * stats.ff.attr_g - stats.ff.attr_xg).abs().sum(0) / stats.ff.n
    torch.testing.assert_close(stats.ff.attribution(center), expected)
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "opt"])
def test_collection_stops_after_the_last_site_and_leaves_the_model_whole(tiny_model, tokenizer, arch):
    """Nothing after the last hooked input runs (the LM head, the last FF projection), and the
    stop leaves no hook behind: a plain forward afterwards runs to the logits."""
    model = tiny_model(arch)
    sites = resolve_sites(model)
    calls: list[str] = []
    head = model.get_output_embeddings()
    handles = [
        head.register_forward_hook(lambda *_: calls.append("head")),
        sites.ff_modules[-1].register_forward_hook(lambda *_: calls.append("last_ff")),
        sites.ff_modules[0].register_forward_hook(lambda *_: calls.append("first_ff")),
    ]
    try:
        stats = _collect(model, sites, tokenizer, CORPUS)
        assert stats.ff.n > 0 and set(calls) == {"first_ff"}
        calls.clear()
        ids = tokenizer(CORPUS[:1], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape[-1] == model.config.vocab_size and calls == ["first_ff", "last_ff", "head"]
    finally:
        for handle in handles:
            handle.remove()
