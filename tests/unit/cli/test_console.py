"""The before/after table, step lines, ConsoleContext and the event follower."""

from __future__ import annotations

import io

import pytest
import torch

from protocol import JobProgress
from selprune.console import ConsoleContext, PhaseClock, follow_events, format_step_line, render_table
from selprune_core.masks import NeuronMask


def _report(step, forget, retain, ff_pruned=0, drops=None):
    def metrics(top1, ci, loss, ppl):
        return {"top1": top1, "topk": 0.9, "loss": loss, "perplexity": ppl, "ci": {"top1": ci}}

    return {
        "step": step,
        "ff_pruned": ff_pruned,
        "attn_pruned": 0,
        "metrics": {"retain": metrics(*retain), "forget": metrics(*forget)},
        "drops": drops or {},
    }


STEPS = [
    _report(0, (0.50, [0.48, 0.52], 2.0, 7.389), (0.40, [0.38, 0.42], 2.5, 12.18)),
    _report(
        5,
        (0.10, [0.09, 0.11], 4.5, 90.02),
        (0.38, [0.36, 0.40], 2.6, 13.46),
        1843,
        {"forget": 0.8, "retain": 0.05},
    ),
]


def test_table_shows_before_after_drop_and_cis():
    table = render_table(STEPS)
    lines = table.splitlines()
    assert "step 0" in lines[0] and "step 5" in lines[0] and "1843 FF" in lines[0]
    assert lines[1].split()[:2] == ["eval", "set"]
    forget = next(line for line in lines if line.startswith("forget"))
    retain = next(line for line in lines if line.startswith("retain"))
    assert lines.index(forget) < lines.index(retain)  # forget first, whatever the dict order
    assert "50.0% [48.0, 52.0]" in forget and "10.0% [9.0, 11.0]" in forget
    assert "80.0%" in forget  # the drop the job reported: (0.50 - 0.10) / 0.50
    assert "2.000 -> 4.500" in forget and "7.389 -> 90.0" in forget
    assert "40.0% [38.0, 42.0]" in retain and "38.0% [36.0, 40.0]" in retain
    assert "5.0%" in retain  # (0.40 - 0.38) / 0.40, as reported


def test_table_handles_missing_values_and_no_steps():
    assert render_table([]) == "no metrics were reported"
    bare = [{"step": 0, "metrics": {"forget": {"top1": None, "ci": {}}}}]
    assert "n/a" in render_table(bare)


def test_step_line():
    line = format_step_line(STEPS[1], steps=5)
    assert line.startswith("step 5/5: 1843 FF / 0 attn pruned")
    assert "forget top-1 10.0% (drop 80.0%)" in line


def _mask():
    return NeuronMask("fp", torch.ones(2, 8, dtype=torch.bool), torch.ones(2, 8, dtype=torch.bool), 2)


def test_console_context_keeps_steps_and_writes_the_mask(tmp_path):
    lines = io.StringIO()
    ctx = ConsoleContext(tmp_path / "masks", file=lines, show_progress=False)
    assert ctx.completed_steps() == [] and ctx.checkpoint() is None and not ctx.should_cancel()
    ctx.progress(JobProgress(phase="collecting_forget", step=1, steps=5, tokens=100))
    mask = _mask()
    checkpoint = mask.to_bytes()
    ctx.step_done(STEPS[0], checkpoint)
    assert ctx.completed_steps() == [STEPS[0]]
    assert ctx.checkpoint() == checkpoint
    assert "step 0/5" in lines.getvalue()

    mask_id = ctx.store_mask(mask.to_bytes(), {"name": "test"})
    assert mask_id == mask.mask_id
    assert ctx.mask_path == tmp_path / "masks" / f"{mask_id}.safetensors"
    assert NeuronMask.load(ctx.mask_path) == mask
    assert '"name": "test"' in (tmp_path / "masks" / f"{mask_id}.json").read_text()
    assert ctx.load_mask(mask_id) == ctx.mask_path.read_bytes()
    from worker.errors import MaskNotFoundError

    with pytest.raises(MaskNotFoundError):
        ctx.load_mask("0" * 24)


def test_follow_events_returns_the_final_state():
    lines = io.StringIO()
    events = [
        ("progress", {"phase": "evaluating", "step": 0, "steps": 5, "tokens": 0}),
        ("step", STEPS[0]),
        ("progress", {"phase": "collecting_forget", "step": 1, "steps": 5, "tokens": 512}),
        ("step", STEPS[1]),
        ("state", {"state": "succeeded"}),
    ]
    assert follow_events(events, file=lines, show_progress=False) == {"state": "succeeded"}
    printed = lines.getvalue().splitlines()
    assert len(printed) == 3  # one line per step, then the time per phase
    assert printed[-1].startswith("time per phase: evaluating ") and "collecting forget" in printed[-1]


def test_phase_clock_sums_each_phase_over_steps():
    now = iter([0.0, 2.0, 5.0, 6.5, 70.0, 70.0])
    clock = PhaseClock(clock=lambda: next(now))
    for phase in ("evaluating", "collecting_forget", "evaluating", "scoring"):
        clock.enter(phase)
    clock.enter("scoring")  # no change, no tick
    assert (
        clock.summary()
        == "time per phase: evaluating 3.5s, collecting forget activations 3.0s, scoring neurons 1m 03.5s "
        "(total 1m 10.0s)"
    )
    assert PhaseClock().summary() == ""


def test_table_shows_the_reported_drop_not_a_recomputed_one():
    # The core's relative_drop is 0.0 when top-1 before is 0; the table shows what the job reported.
    zero = [_report(0, (0.0, [0.0, 0.0], 9.0, 8103.0), (0.4, [0.38, 0.42], 2.5, 12.18))]
    zero.append(
        _report(3, (0.0, [0.0, 0.0], 9.5, 13360.0), (0.4, [0.38, 0.42], 2.5, 12.18), 10, {"forget": 0.0})
    )
    forget = next(line for line in render_table(zero).splitlines() if line.startswith("forget"))
    assert " 0.0%  " in forget
    retain = next(line for line in render_table(zero).splitlines() if line.startswith("retain"))
    assert "n/a" in retain  # no reported drop: nothing is made up
