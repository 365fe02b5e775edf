"""Evaluation applies the LM head apart from the body, only where it scores: for every family the split
gives the model's own logits (soft-capping and logit scaling included), and a model whose forward does
something the split does not know keeps the full forward, with the same metrics."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from selprune_core.config import EvalConfig
from selprune_core.evaluation import evaluate_plan, plan_eval
from selprune_core.families import build_tiny
from selprune_core.lm_head import HEAD_CHUNK, split_head
from tests.helpers import ARCHS, CORPUS, FAMILY_BY_TYPE


@torch.no_grad()
def _assert_split_gives_the_logits(model, tokenizer) -> None:
    split = split_head(model)
    assert split is not None
    enc = tokenizer(CORPUS[:3], return_tensors="pt", padding=True)
    full = model(**enc, use_cache=False).logits  # [batch, pos, vocab]
    parts = split.logits(split.hidden(enc["input_ids"], enc["attention_mask"]))
    valid = enc["attention_mask"].bool()
    torch.testing.assert_close(parts[valid], full[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_split_gives_the_model_logits(tiny_model, tokenizer, arch):
    _assert_split_gives_the_logits(tiny_model(arch), tokenizer)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("gemma2", {"final_logit_softcapping": 3.0}), ("granite", {"logits_scaling": 4.0})],
)
def test_logit_postprocessing_is_reproduced(tokenizer, arch, overrides):
    if arch not in FAMILY_BY_TYPE:
        pytest.skip(f"transformers has no {arch}")
    model = build_tiny(FAMILY_BY_TYPE[arch], vocab_size=len(tokenizer), pad_token_id=0, **overrides)
    _assert_split_gives_the_logits(model, tokenizer)


class ShiftedLogits(LlamaForCausalLM):
    """A causal LM whose forward changes the head's output in a way no config field describes."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits + torch.linspace(0, 3, out.logits.shape[-1])
        return out


def test_a_model_the_split_cannot_reproduce_keeps_the_full_forward(tiny_model, tokenizer):
    base = tiny_model("llama")
    model = ShiftedLogits(base.config).eval()
    model.load_state_dict(base.state_dict())
    assert split_head(model) is None
    text = " ".join(CORPUS)
    cfg = EvalConfig(token_limit=64, batch_size=2, bootstrap_samples=0)
    shifted = evaluate_plan(model, plan_eval(tokenizer, [text], cfg), cfg)
    ids = tokenizer(text, truncation=True, max_length=64, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the reference: scored straight from the model's own logits
        logits = model(input_ids=ids).logits[0, :-1]  # [pred, vocab]
    assert shifted.top1 == pytest.approx((logits.argmax(-1) == ids[0, 1:]).double().mean().item())
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    assert shifted.loss == pytest.approx(loss, rel=1e-5)
    assert evaluate_plan(base, plan_eval(tokenizer, [text], cfg), cfg).loss != pytest.approx(loss, rel=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # rotary positions: no length limit
def test_chunked_head_metrics_equal_full_logits(tiny_model, tokenizer, arch):
    """A text longer than HEAD_CHUNK predictions: chunk sums equal metrics from the full logits."""
    model = tiny_model(arch)
    text = " ".join(CORPUS) * 8
    cfg = EvalConfig(token_limit=2 * HEAD_CHUNK + 9, topk=3, bootstrap_samples=0)
    result = evaluate_plan(model, plan_eval(tokenizer, [text], cfg), cfg)
    ids = tokenizer(text, truncation=True, max_length=cfg.token_limit, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 2 * HEAD_CHUNK + 1
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]  # [pred, vocab]
    targets = ids[0, 1:]
    assert result.n_tokens == targets.numel()
    assert result.top1 == pytest.approx((logits.argmax(-1) == targets).double().mean().item())
    topk = (logits.topk(3, dim=-1).indices == targets[:, None]).any(-1).double().mean().item()
    assert result.topk == pytest.approx(topk)
    loss = torch.nn.functional.cross_entropy(logits, targets).item()
    assert result.loss == pytest.approx(loss, rel=1e-5)
