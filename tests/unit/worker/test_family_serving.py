"""Generation through masks on every listed family, through the real serving engine: rows on
different masks (and none) decoded in one batch each get exactly the text they get alone, and where
the family's cache takes rows mid-flight, a request admitted into a running batch does too."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from protocol import GenerateDone, GenerateTask, SamplingParams
from selprune_core.masks import NeuronMask
from selprune_core.sites import model_fingerprint, resolve_sites
from tests.helpers import ARCHS
from worker.runtime import ModelRuntime
from worker.serve_engine import ServeEngine

PROMPTS = ["the cat sat on the", "def main():", "a quick brown fox"]


def _engine(tiny_model, tokenizer, arch: str, tmp_path: Path) -> tuple[ServeEngine, dict[str, bytes]]:
    model = tiny_model(arch)
    model.save_pretrained(tmp_path / arch)
    tokenizer.save_pretrained(tmp_path / arch)
    sites = resolve_sites(model)
    masks: dict[str, bytes] = {}
    for seed in (1, 2):  # two random masks pruning half of every layer
        g = torch.Generator().manual_seed(seed)
        ff = torch.rand(sites.n_layers, sites.d_mlp, generator=g) > 0.5
        attn = torch.rand(sites.n_layers, sites.d_attn, generator=g) > 0.5
        mask = NeuronMask(model_fingerprint(model), ff, attn, sites.n_heads)
        masks[mask.mask_id] = mask.to_bytes()
    runtime = ModelRuntime(cache_dir=tmp_path / "cache", data_root=tmp_path, device="cpu", dtype="float32")
    engine = ServeEngine(runtime, lambda mask_id, _tenant: masks[mask_id], mask_slots=4, max_prompt_tokens=64)
    return engine, masks


def _task(ref: str, mask_id: str | None, prompt: str, tokens: int) -> GenerateTask:
    now = time.time()
    return GenerateTask(
        request_id=f"{mask_id}:{prompt}",
        tenant="t1",
        model=ref,
        mask_id=mask_id,
        prompts=[prompt],
        # Seeded sampling: greedy text of a random tiny model is often one token repeated, mask or not.
        sampling=SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=7, ignore_eos=True),
        enqueued_at=now,
        deadline=now + 600,
    )


def _texts(events) -> dict[str, str]:
    out = {}
    for task, event in events:
        assert isinstance(event, GenerateDone), event
        out[task.request_id] = event.choices[0].text
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_mask_batches_give_each_row_its_text_alone(tiny_model, tokenizer, arch, tmp_path):
    engine, masks = _engine(tiny_model, tokenizer, arch, tmp_path)
    ref = str(tmp_path / arch)
    mask_a, mask_b = masks
    tasks = [
        _task(ref, mask_a, PROMPTS[0], 6),
        _task(ref, mask_b, PROMPTS[1], 4),
        _task(ref, None, PROMPTS[2], 5),
        _task(ref, None, PROMPTS[0], 6),
    ]
    alone: dict[str, str] = {}
    for task in tasks:
        solo: list = []
        engine.run([task], solo.extend)
        alone.update(_texts(solo))
    # The masks change what the model says (else "each row its own text" would prove nothing).
    assert alone[tasks[0].request_id] != alone[tasks[3].request_id]

    events: list = []
    engine.run(tasks, events.extend)
    assert _texts(events) == alone

    # A request joins a running batch where the cache allows it; elsewhere it waits for an empty one.
    events = []
    engine.admit(tasks[:2], events.extend)
    engine.step(events.extend)
    if engine.can_admit(ref):
        engine.admit(tasks[2:], events.extend)
    else:
        assert ref == engine.model and not engine.can_admit(ref)
    while engine.model is not None:
        engine.step(events.extend)
    if len(events) < len(tasks):
        engine.run(tasks[2:], events.extend)
    assert _texts(events) == alone
