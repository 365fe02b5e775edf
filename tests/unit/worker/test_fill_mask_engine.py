"""The serving lane's fill-mask on tiny random-init masked LMs (RoBERTa and BERT): a masked row equal
to the model with that mask folded into its weights, every row of a mixed-mask batch (chunked, padded
to different lengths) equal to its solo result, "<mask>" read as the model's mask token, and a bad
input failing alone with its index named."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch

from protocol import FillMaskDone, FillMaskTask, GenerateFailed
from selprune_core.masking import fold_into_weights
from selprune_core.masks import NeuronMask
from selprune_core.sites import resolve_sites
from tests.helpers import random_mask
from tests.mlm_helpers import bert_tokenizer, build_mlm_model, roberta_tokenizer
from worker.errors import MaskNotFoundError
from worker.fill_mask_engine import FillMaskEngine, encode_input
from worker.runtime import ModelRuntime

INPUTS = [
    "def add(a, b):\n    return a <mask> b",
    "the cat sat on the <mask>",
    "for i in <mask>(10):\n    <mask>(i)",
    "she sells sea shells by the sea <mask> and the dog sat on the log",
]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory) -> ModelRuntime:
    root: Path = tmp_path_factory.mktemp("fill")
    for name, tokenizer in (("roberta", roberta_tokenizer()), ("bert", bert_tokenizer())):
        build_mlm_model(name, tokenizer).save_pretrained(root / "models" / name)
        tokenizer.save_pretrained(root / "models" / name)
    return ModelRuntime(
        cache_dir=root, data_root=root, device="cpu", dtype="float32", models_root=root / "models"
    )


def task(
    inputs: list[str], mask_id: str | None = None, model: str = "roberta", top_k: int = 5
) -> FillMaskTask:
    now = time.time()
    return FillMaskTask(
        request_id=f"r{now}{mask_id}{len(inputs)}{inputs[0][:3]}".replace(".", "").replace(" ", ""),
        tenant="t",
        model=model,
        mask_id=mask_id,
        inputs=inputs,
        top_k=top_k,
        enqueued_at=now,
        deadline=now + 60,
    )


class Engine:
    """A FillMaskEngine on `runtime` with masks held in memory for tenant "t"."""

    def __init__(self, runtime: ModelRuntime, masks: list[NeuronMask], max_rows: int = 3) -> None:
        self.masks = {m.mask_id: m.to_bytes() for m in masks}
        self.engine = FillMaskEngine(runtime, self._load, mask_slots=4, max_rows=max_rows)

    def _load(self, mask_id: str, tenant: str) -> bytes:
        if tenant != "t" or mask_id not in self.masks:
            raise MaskNotFoundError(mask_id)
        return self.masks[mask_id]

    def run(self, tasks: list[FillMaskTask]) -> list[FillMaskDone | GenerateFailed]:
        replies: dict[str, FillMaskDone | GenerateFailed] = {}
        self.engine.run(tasks, lambda events: replies.update({t.request_id: e for t, e in events}))
        return [replies[t.request_id] for t in tasks]


def top(done: FillMaskDone | GenerateFailed) -> list[list[list[tuple[int, float]]]]:
    assert isinstance(done, FillMaskDone), done
    return [[[(t.id, t.probability) for t in m.tokens] for m in r.masks] for r in done.results]


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
def test_a_masked_row_equals_the_folded_model(runtime, model_type):
    target = runtime.masked_lm(model_type)
    mask = random_mask(target.model, seed=1)
    folded = copy.deepcopy(target.model)
    fold_into_weights(folded, resolve_sites(folded), mask)
    done = Engine(runtime, [mask]).run([task(INPUTS, mask.mask_id, model_type, top_k=100)])[0]
    assert isinstance(done, FillMaskDone)
    for text, result in zip(INPUTS, done.results, strict=True):
        ids, positions = encode_input(target, text)
        assert [m.position for m in result.masks] == positions
        with torch.no_grad():
            expected = (
                folded(input_ids=torch.tensor([ids])).logits[0, positions].softmax(-1)
            )  # [masks, vocab]
        for row, fill in enumerate(result.masks):
            assert len(fill.tokens) == 100 and fill.tokens[0].id == int(expected[row].argmax())
            got = torch.tensor([token.probability for token in fill.tokens])
            torch.testing.assert_close(
                got, expected[row][[token.id for token in fill.tokens]], atol=1e-5, rtol=0
            )
            torch.testing.assert_close(got, expected[row].topk(100).values, atol=1e-5, rtol=0)
        best = [m.tokens[0].id for m in result.masks]
        filled = list(ids)
        for position, token in zip(positions, best, strict=True):
            filled[position] = token
        assert result.filled == target.tokenizer.decode(filled, skip_special_tokens=True)


def test_every_row_of_a_mixed_mask_batch_equals_its_solo_result(runtime):
    target = runtime.masked_lm("roberta")
    masks = [random_mask(target.model, seed=s) for s in (2, 3)]
    tasks = [task(INPUTS[:2], masks[0].mask_id), task(INPUTS[2:]), task(INPUTS[1:], masks[1].mask_id)]
    together = Engine(runtime, masks, max_rows=3).run(tasks)  # 7 rows: chunks of 3 mixing masks
    for one, mixed in zip(tasks, together, strict=True):
        alone = [
            Engine(runtime, masks, max_rows=1).run([task([text], one.mask_id)])[0] for text in one.inputs
        ]
        for row, solo in enumerate(alone):
            for (a_ids, a_p), (b_ids, b_p) in zip(
                [x for m in top(mixed)[row] for x in m], [x for m in top(solo)[0] for x in m], strict=True
            ):
                assert a_ids == b_ids and a_p == pytest.approx(b_p, abs=1e-5)


def test_a_bad_input_fails_alone_naming_it(runtime):
    mask_token_bert = "[MASK]"
    engine = Engine(runtime, [])
    good, no_mask, too_long, bert_literal, unknown = engine.run(
        [
            task(INPUTS[:1]),
            task([INPUTS[0], "no mask here"]),
            task(["word " * 80 + "<mask>"]),
            task([f"the cat sat on the {mask_token_bert}", "the <mask> sat"], model="bert"),
            task(INPUTS[:1], mask_id="nope"),
        ]
    )
    assert isinstance(good, FillMaskDone) and isinstance(bert_literal, FillMaskDone)
    assert isinstance(no_mask, GenerateFailed) and no_mask.error.type == "InvalidInput"
    assert no_mask.error.message.startswith("inputs[1] has no mask token")
    assert isinstance(too_long, GenerateFailed) and "positions hold 62" in too_long.error.message
    assert isinstance(unknown, GenerateFailed) and unknown.error.type == "MaskNotFound"


def test_a_causal_model_is_a_kind_mismatch(runtime, tmp_path, tiny_model, tokenizer):
    folder = runtime.models_root / "llama"  # type: ignore[operator]
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (done,) = Engine(runtime, []).run([task(INPUTS[:1], model="llama")])
    assert isinstance(done, GenerateFailed) and done.error.type == "ModelKindMismatch"
