"""Log-probabilities of tokens under the model, as OpenAI's `logprobs` and `echo` report them.

Each position gives the log-softmax of the model's raw logits (before temperature, top-k or top-p: the
model's own distribution, whatever the sampling settings) at the token that follows, and the `k` most
likely tokens there. With `echo`, a prompt's tokens get them too, from the prefill's logits; its first
token has no prediction (None), as in OpenAI's and vLLM's answers.

Through a mask the logits are the hooked model's, so a row of a mixed-mask batch gets exactly the
log-probabilities it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TokenLogprob", "chosen_logprobs", "position_logprobs", "prompt_logprobs"]


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a prompt or completion, its log-probability, and the top alternatives there."""

    token_id: int
    logprob: float | None  # None for a prompt's first token: nothing predicts it
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


def position_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Per position of logits [pos, vocab] (fp16/bf16 scored in fp32): the log-probability of
    targets [pos] and the `k` most likely tokens, most likely first."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [pos, vocab]
    chosen = logp.gather(1, targets[:, None].to(logp.device)).squeeze(1)  # [pos]
    if k > 0:
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)  # [pos, k] each, sorted
        top_values, top_ids = values.tolist(), ids.tolist()
    else:
        top_values = top_ids = [[] for _ in range(targets.numel())]
    return [
        TokenLogprob(int(token), float(value), tuple(zip(ids_row, values_row, strict=True)))
        for token, value, ids_row, values_row in zip(
            targets.tolist(), chosen.tolist(), top_ids, top_values, strict=True
        )
    ]


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], k: int) -> list[TokenLogprob]:
    """A prompt's tokens with their log-probabilities, from the logits [len(prompt), vocab] at its own
    positions (the last position predicts the first generated token and is not used here)."""
    first = TokenLogprob(prompt_ids[0], None)
    if len(prompt_ids) == 1:
        return [first]
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long)
    return [first, *position_logprobs(logits[:-1], targets, k)]


def chosen_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, ks: list[int | None]
) -> list[TokenLogprob | None]:
    """Per row of last-position logits [batch, vocab]: the chosen token [batch] with its log-probability
    and `ks[row]` alternatives, or None for rows that did not ask (`ks[row]` None)."""
    asked = [row for row, k in enumerate(ks) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(ks)
    if not asked:
        return out
    index = torch.tensor(asked, device=logits.device)
    k_max = max(ks[row] or 0 for row in asked)
    for row, entry in zip(asked, position_logprobs(logits[index], chosen[index], k_max), strict=True):
        out[row] = TokenLogprob(entry.token_id, entry.logprob, entry.top[: ks[row] or 0])
    return out
