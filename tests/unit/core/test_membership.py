"""The loss attack: its AUC follows the definition (pairs, ties half), per-text losses equal a direct
computation, and the interval brackets the estimate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selprune_core.config import EvalConfig
from selprune_core.membership import loss_attack_auc, membership_inference, text_losses
from tests.helpers import CORPUS


def test_auc_from_pairs():
    assert loss_attack_auc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 1.0  # members lower
    assert loss_attack_auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert loss_attack_auc(torch.tensor([2.0]), torch.tensor([2.0])) == 0.5  # a tie counts half
    # pairs (1,2) member lower, (3,2) higher, (1,0) higher, (3,0) higher: 1 of 4
    assert loss_attack_auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 0.0])) == 0.25


def test_text_losses_equal_a_direct_computation(tiny_model, tokenizer):
    model = tiny_model("llama")
    cfg = EvalConfig(token_limit=16, bootstrap_samples=0, sample_tokens=10_000)
    texts = [t for t in CORPUS if len(tokenizer(t)["input_ids"]) > 1]
    losses = text_losses(model, tokenizer, texts, cfg)
    for text, loss in zip(texts, losses.tolist(), strict=True):
        ids = tokenizer(text, truncation=True, max_length=16, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        assert loss == pytest.approx(F.cross_entropy(logits, ids[0, 1:]).item(), rel=1e-5)


def test_members_the_model_was_trained_on_are_found(tiny_model, tokenizer):
    """A model fine-tuned on the members (and only them) gives them lower loss: AUC near 1, the
    interval around it; the untouched model cannot tell the same split apart as well."""
    from selprune_core.finetune import FinetuneConfig, finetune

    members, nonmembers = CORPUS[: len(CORPUS) // 2], CORPUS[len(CORPUS) // 2 :]
    cfg = EvalConfig(token_limit=32, bootstrap_samples=200, sample_tokens=10_000)
    model = tiny_model("llama")
    before = membership_inference(model, tokenizer, members, nonmembers, cfg)
    finetune(
        model, tokenizer, members, FinetuneConfig(steps=15, learning_rate=3e-3, batch_size=2, token_limit=32)
    )
    after = membership_inference(model, tokenizer, members, nonmembers, cfg)
    assert after.auc > before.auc and after.auc >= 0.9
    assert after.ci[0] <= after.auc <= after.ci[1]
    assert after.n_members == len(members) and after.member_loss < after.nonmember_loss
