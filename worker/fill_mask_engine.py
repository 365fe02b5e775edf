"""FillMaskEngine: a masked LM's top tokens at the mask positions of its inputs, on the serving lane,
every input a row through its own mask (the shared machinery, masks and batching, is
worker/row_engine.py's `RowEngine`).

An input's literal "<mask>" is read as the model's own mask token (so one request shape fits RoBERTa's
"<mask>" and BERT's "[MASK]"), then the text is tokenized with its special tokens, as for evaluation.
An input without a mask token, with more than `MAX_FILL_MASKS`, or longer than the model's positions
hold is the caller's error (`InvalidInput`, naming the input). Rows are right-padded with the pad id
under an attention mask, so a row's logits do not depend on what else shares its batch (RoBERTa numbers
positions from the non-pad ids, BERT from 0: both are unchanged by padding on the right).
"""

from __future__ import annotations

from typing import Any

import torch

from protocol import FilledInput, FilledToken, FillMaskDone, FillMaskTask, GenerateTimings, MaskFill
from protocol.fill_mask import MASK_LITERAL, MAX_FILL_MASKS
from selprune_core.mlm_measure import MaskedLM
from worker.row_engine import RowEngine
from worker.serve_engine import ServeError

__all__ = ["FillMaskEngine", "encode_input"]


def encode_input(target: MaskedLM, text: str) -> tuple[list[int], list[int]]:
    """(token ids with special tokens, mask positions) of one input; ServeError InvalidInput otherwise."""
    tokenizer = target.tokenizer
    mask_token, mask_id = str(tokenizer.mask_token), int(tokenizer.mask_token_id)
    ids = [int(i) for i in tokenizer(text.replace(MASK_LITERAL, mask_token))["input_ids"]]
    positions = [pos for pos, token in enumerate(ids) if token == mask_id]
    if not positions:
        raise ServeError(
            "InvalidInput", f"has no mask token: write {MASK_LITERAL} (or {mask_token}) where to fill"
        )
    if len(positions) > MAX_FILL_MASKS:
        raise ServeError("InvalidInput", f"has {len(positions)} mask tokens; the limit is {MAX_FILL_MASKS}")
    if len(ids) > target.max_tokens:
        raise ServeError(
            "InvalidInput", f"is {len(ids)} tokens long; the model's positions hold {target.max_tokens}"
        )
    return ids, positions


class FillMaskEngine(RowEngine[FillMaskTask, MaskedLM, FillMaskDone]):
    """Rows are (ids, mask positions); outputs the probabilities at the mask positions [masks, vocab]."""

    what = "fill-mask"

    def target(self, ref: str) -> MaskedLM:
        return self.runtime.masked_lm(ref)  # ConfigError for another kind

    def prepare(self, task: FillMaskTask, target: MaskedLM) -> list[Any]:
        rows = []
        for i, text in enumerate(task.inputs):
            try:
                rows.append(encode_input(target, text))
            except ServeError as exc:
                raise ServeError(exc.type, f"inputs[{i}] {exc}") from None
        return rows

    def compute(self, target: MaskedLM, rows: list[Any]) -> list[Any]:
        width = max(len(ids) for ids, _ in rows)
        pad = int(target.tokenizer.pad_token_id)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [rows, pos], right-padded
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (tokens, _) in enumerate(rows):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            attention[row, : len(tokens)] = 1
        logits = target.model(
            input_ids=ids.to(target.device), attention_mask=attention.to(target.device)
        ).logits
        return [logits[row, positions].float().softmax(-1).cpu() for row, (_, positions) in enumerate(rows)]

    def answer(
        self, task: FillMaskTask, target: MaskedLM, outputs: list[Any], timings: GenerateTimings
    ) -> FillMaskDone:
        tokenizer = target.tokenizer
        results = []
        for text, probs in zip(task.inputs, outputs, strict=True):
            ids, positions = encode_input(target, text)
            top = probs.topk(min(task.top_k, probs.shape[-1]), dim=-1)  # [masks, k]
            masks = [
                MaskFill(
                    position=position,
                    tokens=[
                        FilledToken(id=int(i), token=str(tokenizer.decode([int(i)])), probability=float(p))
                        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
                    ],
                )
                for position, values, indices in zip(positions, top.values, top.indices, strict=True)
            ]
            filled = list(ids)
            for position, best in zip(positions, top.indices[:, 0].tolist(), strict=True):
                filled[position] = int(best)
            text_out = str(tokenizer.decode(filled, skip_special_tokens=True))
            results.append(FilledInput(masks=masks, filled=text_out))
        return FillMaskDone(model=task.model, mask_id=task.mask_id, results=results, timings=timings)
