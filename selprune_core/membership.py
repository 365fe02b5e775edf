"""Membership inference: can an attacker tell the texts an unlearning run used from texts it never saw?

The loss attack (the `mia_loss` of the unlearning benchmarks, from its definition): score each text by
the model's mean next-token loss on it, and ask how well that score separates members (the forget
texts the run trained its statistics on) from non-members (held-out texts of the same source). The
figure is the ROC AUC of "lower loss means member":

    AUC = P(loss(member) < loss(non-member)) + 0.5 * P(equal)

over all member/non-member pairs (the Mann-Whitney U statistic). 0.5 means the two are
indistinguishable; above 0.5 members look familiar; below 0.5 the unlearning treated them visibly
differently (it raised their loss more than that of unseen texts of the same kind). The interval is a
95% percentile bootstrap that resamples members and non-members apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune_core.config import EvalConfig
from selprune_core.evaluation import CE_SUM, N_PRED, plan_eval, text_sums

__all__ = ["MembershipResult", "loss_attack_auc", "membership_inference", "text_losses"]


@dataclass(frozen=True)
class MembershipResult:
    auc: float
    ci: tuple[float, float]  # 95% bootstrap interval
    n_members: int
    n_nonmembers: int
    member_loss: float  # mean of the members' per-text losses
    nonmember_loss: float


def text_losses(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], cfg: EvalConfig
) -> torch.Tensor:
    """Mean next-token cross-entropy of each text [text] (texts chosen as evaluation chooses them)."""
    sums = text_sums(model, plan_eval(tokenizer, texts, cfg), cfg)  # [text, N_STATS]
    return sums[:, CE_SUM] / sums[:, N_PRED]


def loss_attack_auc(members: torch.Tensor, nonmembers: torch.Tensor) -> float:
    """P(member loss < non-member loss) + half the ties, over every pair [member, non-member]."""
    a, b = members.double()[:, None], nonmembers.double()[None, :]
    return float((a < b).double().mean() + 0.5 * (a == b).double().mean())


def membership_inference(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    members: Sequence[str],
    nonmembers: Sequence[str],
    cfg: EvalConfig,
) -> MembershipResult:
    """The loss attack's AUC on `members` vs `nonmembers` through `model` (apply a mask around the call),
    with `cfg.bootstrap_samples` resamples (seeded by `cfg.seed`) for the interval."""
    member_losses = text_losses(model, tokenizer, members, cfg)
    nonmember_losses = text_losses(model, tokenizer, nonmembers, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    draws = []
    for _ in range(cfg.bootstrap_samples):
        a = member_losses[torch.randint(member_losses.numel(), (member_losses.numel(),), generator=gen)]
        b = nonmember_losses[
            torch.randint(nonmember_losses.numel(), (nonmember_losses.numel(),), generator=gen)
        ]
        draws.append(loss_attack_auc(a, b))
    auc = loss_attack_auc(member_losses, nonmember_losses)
    if draws:
        lo, hi = torch.quantile(
            torch.tensor(draws, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64)
        ).tolist()
    else:
        lo = hi = float("nan")
    return MembershipResult(
        auc=auc,
        ci=(float(lo), float(hi)),
        n_members=member_losses.numel(),
        n_nonmembers=nonmember_losses.numel(),
        member_loss=float(member_losses.mean()),
        nonmember_loss=float(nonmember_losses.mean()),
    )
