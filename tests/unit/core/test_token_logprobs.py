"""Log-probabilities of prompt and generated tokens: they equal the log-softmax of the hooked model's
logits, and a row of a mixed-mask batch gets exactly what it gets alone."""

from __future__ import annotations

import pytest
import torch

from selprune_core.config import SamplingConfig
from selprune_core.decoding import DecodeBatch
from selprune_core.generation import GenerationRow, generate_rows
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.sites import model_fingerprint, resolve_sites
from selprune_core.token_logprobs import TokenLogprob
from tests.helpers import CORPUS, random_mask


def _rows(tokenizer, prompts, **sampling):
    cfg = SamplingConfig(max_new_tokens=5, temperature=0.0, ignore_eos=True, **sampling)
    return [GenerationRow(tokenizer(p)["input_ids"], cfg) for p in prompts]


def _run(model, sites, masks, rows, tokenizer):
    """Generate `rows` as one batch, row i through masks[i]."""
    batch = DecodeBatch(model, tokenizer, rows)
    with torch.no_grad(), apply_mask(model, sites, masks):
        batch.prefill()
        done = dict(batch.pop_finished())
        while len(batch):
            batch.step()
            done.update(batch.pop_finished())
    return [done[i] for i in range(len(rows))]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logprobs_are_the_log_softmax_of_the_hooked_logits(tiny_model, tokenizer, arch):
    model = tiny_model(arch)
    sites, mask = resolve_sites(model), random_mask(model, 1)
    (gen,) = _run(model, sites, [mask], _rows(tokenizer, CORPUS[:1], logprobs=3, echo=True), tokenizer)
    prompt = tokenizer(CORPUS[0])["input_ids"]
    ids = torch.tensor([prompt + gen.token_ids])  # [1, prompt + generated]
    with torch.no_grad(), apply_mask(model, sites, mask):
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # [pos, vocab]
    entries = gen.logprobs
    assert entries is not None and len(entries) == ids.shape[1]
    assert entries[0] == TokenLogprob(prompt[0], None)
    for pos, entry in enumerate(entries[1:], start=1):
        assert entry.token_id == ids[0, pos]
        assert entry.logprob == pytest.approx(logp[pos - 1, entry.token_id].item(), abs=1e-4)
        top_values, top_ids = logp[pos - 1].topk(3)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top_values.tolist(), abs=1e-4)
    # greedy: every generated token is its position's most likely one
    assert all(e.top[0][0] == e.token_id for e in entries[len(prompt) :])


def test_mixed_mask_rows_get_their_solo_logprobs(tiny_model, tokenizer):
    model = tiny_model("llama")
    sites = resolve_sites(model)
    masks = [random_mask(model, 1), random_mask(model, 2), NeuronMask.full(sites, model_fingerprint(model))]
    prompts = [CORPUS[0], CORPUS[1] + " and more words here", CORPUS[2]]
    rows = _rows(tokenizer, prompts, logprobs=2, echo=True)
    mixed = _run(model, sites, masks, rows, tokenizer)
    for i, mask in enumerate(masks):
        (alone,) = _run(model, sites, [mask], [rows[i]], tokenizer)
        assert mixed[i].token_ids == alone.token_ids
        assert mixed[i].logprobs is not None and alone.logprobs is not None
        for a, b in zip(mixed[i].logprobs, alone.logprobs, strict=True):
            assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
            assert (a.logprob is None) == (b.logprob is None)
            if a.logprob is not None:
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_no_echo_reports_generated_tokens_only_and_off_costs_nothing(tiny_model, tokenizer):
    model = tiny_model("llama")
    rows = [*_rows(tokenizer, CORPUS[:1], logprobs=0), *_rows(tokenizer, CORPUS[1:2])]
    with_lp, without = generate_rows(model, tokenizer, rows)
    assert with_lp.logprobs is not None and len(with_lp.logprobs) == len(with_lp.token_ids) == 5
    assert all(e.top == () and e.logprob is not None and e.logprob <= 0 for e in with_lp.logprobs)
    assert without.logprobs is None
