"""The code/prose masked LM's recipe, in a cheap form: a tiny recipe trained twice gives the same
tokenizer and bit-identical weights, the tokenizer has RoBERTa's layout and saves to a folder that
Auto* classes load, and the cache key follows every setting and the training texts.

Training here is cut to three steps of a 16-wide, one-layer model on the test corpus (about a second)."""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from selprune_core.mlm_measure import load_masked_lm
from selprune_core.mlm_model import RECIPE_VERSION, MlmRecipe, recipe_key, train_mlm, train_tokenizer
from tests.mlm_helpers import CODE, PROSE

TINY = MlmRecipe(
    vocab_size=300,
    tokenizer_code_chars=1000,
    max_tokens=16,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    steps=3,
    batch_size=4,
)


def test_training_twice_with_one_seed_gives_identical_tokenizer_and_weights():
    first, first_tok, first_loss = train_mlm(TINY, CODE, PROSE)
    second, second_tok, second_loss = train_mlm(TINY, CODE, PROSE)
    assert first_tok.get_vocab() == second_tok.get_vocab() and first_loss == second_loss
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    other, _, _ = train_mlm(dataclasses.replace(TINY, seed=1), CODE, PROSE)
    assert not torch.equal(other.state_dict()["lm_head.dense.weight"], a["lm_head.dense.weight"])
    assert not first.training and torch.get_num_threads() >= 1  # back in eval mode, threads restored


def test_the_tokenizer_has_roberta_layout_and_round_trips(tmp_path):
    tok = train_tokenizer(TINY, CODE, PROSE)
    assert len(tok) == TINY.vocab_size
    assert [tok.convert_ids_to_tokens(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tok.mask_token_id == len(tok) - 1 and tok.pad_token_id == 1
    ids = tok("def f(x): return x")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and tok.decode(ids[1:-1]) == "def f(x): return x"
    # The mask token takes the space before it, so a filled mask reads like the text it replaced.
    prefix = tok("return a", add_special_tokens=False)["input_ids"]
    masked = tok("return a <mask> 1")["input_ids"]
    assert masked[1 : len(prefix) + 2] == [*prefix, tok.mask_token_id]
    model, tok, _ = train_mlm(TINY, CODE, PROSE)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("a b")["input_ids"] == tok("a b")["input_ids"]
    assert type(AutoModelForMaskedLM.from_pretrained(tmp_path)).__name__ == "RobertaForMaskedLM"
    loaded = load_masked_lm(tmp_path)
    assert loaded.max_tokens == TINY.max_tokens and loaded.sites.n_layers == 1


def test_the_cache_key_follows_settings_and_texts():
    texts = {"python_code": CODE, "english_prose": PROSE}
    key = recipe_key(TINY, texts)
    assert key == recipe_key(TINY, dict(texts)) and key.startswith(f"v{RECIPE_VERSION}-")
    assert recipe_key(dataclasses.replace(TINY, steps=4), texts) != key
    assert recipe_key(TINY, {**texts, "english_prose": PROSE[:-1]}) != key
