"""DecodeBatch: rows join a running batch and leave it as they finish, and each row still gets exactly
the tokens it gets alone (greedy and seeded sampling), on every architecture family."""

from __future__ import annotations

import pytest

from selprune_core.config import SamplingConfig
from selprune_core.decoding import DecodeBatch, GenerationRow
from selprune_core.generation import encode_prompts, generate_rows
from tests.helpers import ARCHS

PROMPTS = ["the cat sat on the", "def main():", "a quick brown fox jumps over", "import os"]


def _rows(tokenizer) -> list[GenerationRow]:
    ids = encode_prompts(tokenizer, PROMPTS)
    settings = [
        SamplingConfig(max_new_tokens=7, temperature=0.0, ignore_eos=True),
        SamplingConfig(max_new_tokens=3, temperature=0.0, ignore_eos=True),
        SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=5, seed=9, ignore_eos=True),
        SamplingConfig(max_new_tokens=5, temperature=0.0, ignore_eos=True),
    ]
    return [GenerationRow(i, s) for i, s in zip(ids, settings, strict=True)]


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_admitted_mid_flight_match_rows_alone(tiny_model, tokenizer, arch):
    model = tiny_model(arch)
    rows = _rows(tokenizer)
    alone = [generate_rows(model, tokenizer, [row])[0] for row in rows]

    running = DecodeBatch(model, tokenizer, rows[:2], keys=[0, 1])
    running.prefill()
    results = dict(running.pop_finished())
    if not running.mergeable:
        pytest.skip(f"{arch}: its cache cannot take rows mid-flight (decodes as whole batches)")
    for _ in range(2):  # the first rows are two tokens in when the others arrive
        running.step()
        results.update(running.pop_finished())
    joining = DecodeBatch(model, tokenizer, rows[2:], keys=[2, 3])
    joining.prefill()
    running.extend(joining)
    assert len(running) == 4 - len(results)
    while len(running):
        results.update(running.pop_finished())
        if len(running):
            running.step()
    assert [results[i] for i in range(4)] == alone
    assert [g.completion_tokens for g in alone] == [7, 3, 6, 5]


def test_finished_rows_leave_and_padding_columns_are_trimmed(tiny_model, tokenizer):
    model = tiny_model("llama")
    long_prompt, short_prompt = encode_prompts(tokenizer, ["a quick brown fox jumps over the lazy dog", "hi"])
    rows = [
        GenerationRow(long_prompt, SamplingConfig(max_new_tokens=1, temperature=0.0, ignore_eos=True)),
        GenerationRow(short_prompt, SamplingConfig(max_new_tokens=4, temperature=0.0, ignore_eos=True)),
    ]
    batch = DecodeBatch(model, tokenizer, rows)
    batch.prefill()
    assert batch.attention_mask.shape == (2, len(long_prompt))
    ((key, gen),) = batch.pop_finished()
    assert key == 0 and gen.completion_tokens == 1 and batch.keys == [1]
    # Only the short row is left: the columns that padded it to the long prompt are gone from the cache.
    assert batch.attention_mask.shape == (1, len(short_prompt))
    assert batch.cache.get_seq_length() == len(short_prompt)
    batch.step()
    assert batch.attention_mask.shape == (1, len(short_prompt) + 1)


def test_streamed_rows_only(tiny_model, tokenizer):
    model = tiny_model("llama")
    rows = _rows(tokenizer)[:2]
    batch = DecodeBatch(model, tokenizer, rows, keys=["quiet", "loud"], stream=[False, True])
    pieces = batch.prefill()
    assert {key for key, _ in pieces} <= {"loud"}
