from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from selprune_core.config import SamplingConfig
from selprune_core.generation import (
    GenerationRow,
    apply_chat_template,
    encode_prompts,
    generate,
    generate_rows,
    sample_next,
)
from tests.helpers import build_model, build_tokenizer

PROMPTS = ["the cat sat on the mat and", "def", "a quick brown fox jumps over the"]  # 3 different lengths
GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tokenizer):
    return build_model(request.param, tokenizer, seed=1)


def hf_greedy(model, tokenizer, prompts, max_new_tokens):
    """Reference: model.generate on a left-padded batch, rows cut at EOS."""
    left = build_tokenizer()
    left.padding_side = "left"
    enc = left(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
        )
    rows = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        rows.append(row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
    return rows


def test_greedy_matches_hf_generate_with_left_padding(model, tokenizer):
    ours = generate(model, tokenizer, PROMPTS, GREEDY, batch_size=3)
    assert [g.token_ids for g in ours] == hf_greedy(model, tokenizer, PROMPTS, 8)
    alone = [generate(model, tokenizer, [p], GREEDY)[0] for p in PROMPTS]
    assert [g.token_ids for g in alone] == [g.token_ids for g in ours]
    assert tokenizer.padding_side == "right"  # the shared tokenizer is never mutated
    for g, prompt in zip(ours, PROMPTS, strict=True):
        assert g.prompt_tokens == len(tokenizer(prompt)["input_ids"])
        assert g.completion_tokens == len(g.token_ids) == 8 and g.finish_reason == "length"
        assert g.text == tokenizer.decode(g.token_ids, skip_special_tokens=True)


def test_eos_from_generation_config_stops_row(tokenizer):
    model = build_model("llama", tokenizer, seed=2)
    first = generate(model, tokenizer, PROMPTS[:1], GREEDY)[0].token_ids[0]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]
    out = generate(model, tokenizer, PROMPTS, GREEDY)
    assert out[0].token_ids == [] and out[0].text == "" and out[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(model, tokenizer):
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=0, seed=7)
    a = generate(model, tokenizer, PROMPTS, cfg, batch_size=2)
    b = generate(model, tokenizer, PROMPTS, cfg, batch_size=2)
    c = generate(
        model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=0, seed=8)
    )
    assert a == b
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_stop_string_truncates_text(tokenizer):
    model = build_model("llama", tokenizer, seed=3)
    base = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=0, seed=0)
    full = generate(model, tokenizer, ["the cat"], base)[0]
    # Stop on the text of the 4th generated token, so the cut lands inside the completion.
    stop = tokenizer.decode(full.token_ids[3:4])
    assert stop.strip() and stop.isascii(), f"pick another seed: token text {stop!r}"
    cut = full.text.find(stop)
    out = generate(
        model, tokenizer, ["the cat"], SamplingConfig(**{**base.__dict__, "stop": ("#never#", stop)})
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert out.completion_tokens <= 4 and out.token_ids == full.token_ids[: out.completion_tokens]


def test_max_new_tokens_and_empty_prompt(tokenizer):
    model = build_model("gpt2", tokenizer)
    out = generate(model, tokenizer, ["", "the"], SamplingConfig(max_new_tokens=3, temperature=0.7, seed=1))
    assert [g.completion_tokens for g in out] == [3, 3]
    assert out[0].prompt_tokens == 1  # BOS alone


def test_sample_next_filters():
    logits = torch.arange(5, dtype=torch.float32).repeat(400, 1)  # [400, 5], token 4 most likely
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, 0, 1.0, gen).eq(4).all()
    assert sample_next(logits, 1.0, 1, 1.0, gen).eq(4).all()
    assert set(sample_next(logits, 1.0, 2, 1.0, gen).tolist()) == {3, 4}
    # softmax(0..4) = [.012, .032, .086, .234, .636]: top_p .5 keeps {4}, .7 keeps {3, 4}, .9 keeps {2, 3, 4}
    assert sample_next(logits, 1.0, 0, 0.5, gen).eq(4).all()
    assert set(sample_next(logits, 1.0, 0, 0.7, gen).tolist()) == {3, 4}
    assert set(sample_next(logits, 1.0, 0, 0.9, gen).tolist()) == {2, 3, 4}
    assert set(sample_next(logits, 5.0, 0, 1.0, gen).tolist()) == {0, 1, 2, 3, 4}
    # per-row settings: even rows greedy, odd rows sampled with top_k 2
    temps = torch.tensor([0.0, 1.0]).repeat(200)
    picks = sample_next(logits, temps, torch.tensor(2), 1.0, gen)
    assert picks[0::2].eq(4).all() and set(picks[1::2].tolist()) == {3, 4}


def test_sample_next_seeded():
    logits = torch.randn(4, 50)
    a = sample_next(logits, 1.0, 10, 0.9, torch.Generator().manual_seed(5))
    b = sample_next(logits, 1.0, 10, 0.9, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (4,) and a.dtype == torch.long


def test_apply_chat_template():
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    plain = build_tokenizer()
    assert apply_chat_template(plain, messages) == "system: be nice\nuser: hi\nassistant:"
    plain.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert apply_chat_template(plain, messages) == "<system>be nice\n<user>hi\n<assistant>"


def test_rows_in_a_batch_generate_what_they_would_alone(model, tokenizer):
    """Mixed settings in one batch: every row, greedy or seeded-sampled, matches its run alone."""
    ids = encode_prompts(tokenizer, PROMPTS)
    settings = [
        SamplingConfig(max_new_tokens=6, temperature=0.0),
        SamplingConfig(max_new_tokens=9, temperature=0.9, top_k=5, seed=11),
        SamplingConfig(max_new_tokens=3, temperature=1.3, top_p=0.8, seed=12),
    ]
    rows = [GenerationRow(i, cfg) for i, cfg in zip(ids, settings, strict=False)]
    together = generate_rows(model, tokenizer, rows)
    alone = [generate_rows(model, tokenizer, [row])[0] for row in rows]
    assert together == alone
    assert [g.completion_tokens for g in together] == [6, 9, 3]  # each row its own limit (no EOS here)


def test_seeded_prompt_ignores_batch_size(model, tokenizer):
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=0, seed=3)
    assert generate(model, tokenizer, PROMPTS, cfg, batch_size=1) == generate(
        model, tokenizer, PROMPTS, cfg, batch_size=3
    )


def test_streamed_pieces_add_up_to_the_text(tokenizer):
    model = build_model("llama", tokenizer, seed=3)
    base = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=0, seed=0)
    full = generate(model, tokenizer, ["the cat"], base)[0]
    stop = tokenizer.decode(full.token_ids[5:7])
    ids = encode_prompts(tokenizer, ["the cat", "a dog"])
    rows = [GenerationRow(ids[0], replace(base, stop=(stop,))), GenerationRow(ids[1], base)]
    pieces: dict[int, list[str]] = {0: [], 1: []}
    steps: list[int] = []

    def on_text(step: list[tuple[int, str]]) -> None:
        steps.append(len(step))
        for row, text in step:
            pieces[row].append(text)

    out = generate_rows(model, tokenizer, rows, on_text=on_text)
    assert "".join(pieces[0]) == out[0].text and "".join(pieces[1]) == out[1].text
    assert out[0].finish_reason == "stop" and stop not in out[0].text
    assert len(steps) > 1 and max(steps) <= 2  # one call per step, at most one piece per row
