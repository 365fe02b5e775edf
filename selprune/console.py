"""What the CLI shows on a terminal: its output lines, progress bars, step lines and the before/after table.

Only this module and selprune/generate_command.py (which streams generated text) write to the
terminal: the commands write results to stdout with `out` and errors to stderr with `err`.
`ConsoleContext` implements worker.context.JobContext for a local `selprune prune` run (progress on
the console, steps and checkpoint in memory, masks as files). `follow_events` shows the same progress
for a job run by a gateway, from its event stream. `render_table` draws the before/after table for
both, from the list of step reports (dicts, step 0 first) that both produce.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from protocol import JobProgress
from selprune.client import ApiError

# Eval sets shown first, in this order; others follow in the order the reports list them.
_PRIMARY_SETS = ("forget", "retain")
_PHASE_LABELS = {
    "queued": "queued",
    "loading": "loading model",
    "resolving_data": "loading data",
    "evaluating": "evaluating",
    "collecting_retain": "collecting retain activations",
    "collecting_forget": "collecting forget activations",
    "scoring": "scoring neurons",
    "done": "done",
}


# --- output lines ---------------------------------------------------------------------------------------
def out(*lines: str) -> None:
    """Write lines to stdout (results, tables, what happened)."""
    for line in lines:
        print(line, flush=True)


def err(message: str) -> None:
    """Write an error or warning to stderr."""
    print(f"selprune: {message}", file=sys.stderr, flush=True)


def error_text(exc: Exception) -> str:
    """One line for a failure of the gateway or the local stack."""
    if isinstance(exc, ApiError):
        return f"the gateway answered {exc.status} {exc.type}: {exc.message}"
    return str(exc)


def phase_label(phase: str) -> str:
    return _PHASE_LABELS.get(phase, phase.replace("_", " "))


class PhaseClock:
    """Wall time spent in each phase of a job, summed over its steps, as the console saw it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._phase: str | None = None
        self._since = 0.0
        self.seconds: dict[str, float] = {}  # phase -> seconds, in first-seen order

    def enter(self, phase: str | None) -> None:
        """The job is now in `phase` (None: it ended); the previous phase's time is booked."""
        if phase == self._phase:
            return
        now = self._clock()
        if self._phase is not None:
            self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + now - self._since
        self._phase, self._since = phase, now

    def summary(self) -> str:
        """One line: each phase's time and the total; empty when no phase was seen."""
        self.enter(None)
        if not self.seconds:
            return ""
        parts = [f"{phase_label(p)} {_duration(s)}" for p, s in self.seconds.items()]
        return f"time per phase: {', '.join(parts)} (total {_duration(sum(self.seconds.values()))})"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m {rest:04.1f}s" if minutes else f"{rest:.1f}s"


# --- the before/after table -----------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _plain(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def _accuracy_cell(metrics: Mapping[str, Any]) -> str:
    """'45.1% [44.0, 46.2]': top-1 accuracy with its 95% interval (in percent), when there is one."""
    top1 = _num(metrics.get("top1"))
    ci = (metrics.get("ci") or {}).get("top1")
    if top1 is None or not isinstance(ci, list | tuple) or len(ci) != 2:
        return _pct(top1)
    lo, hi = _num(ci[0]), _num(ci[1])
    if lo is None or hi is None:
        return _pct(top1)
    return f"{_pct(top1)} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _set_names(first: Mapping[str, Any], last: Mapping[str, Any]) -> list[str]:
    names = list(dict.fromkeys([*(first.get("metrics") or {}), *(last.get("metrics") or {})]))
    return [n for n in _PRIMARY_SETS if n in names] + [n for n in names if n not in _PRIMARY_SETS]


def render_table(steps: Sequence[Mapping[str, Any]]) -> str:
    """The before (first report) / after (last report) table: one row per eval set.

    Columns: top-1 accuracy before and after with 95% CIs, the relative top-1 drop, and loss and
    perplexity before -> after. The drop is the one the job reported with its last step (the core's,
    against step 0), not recomputed here.
    """
    steps = [r for r in steps if r.get("accepted", True)]  # rejected trials left the mask unchanged
    if not steps:
        return "no metrics were reported"
    first, last = steps[0], steps[-1]
    header = ["eval set", "top-1 before [95% CI]", "top-1 after [95% CI]", "drop", "loss", "perplexity"]
    rows = [header]
    for name in _set_names(first, last):
        before = (first.get("metrics") or {}).get(name) or {}
        after = (last.get("metrics") or {}).get(name) or {}
        drop = _num((last.get("drops") or {}).get(name))
        rows.append(
            [
                name,
                _accuracy_cell(before),
                _accuracy_cell(after),
                _pct(drop),
                f"{_plain(_num(before.get('loss')))} -> {_plain(_num(after.get('loss')))}",
                f"{_plain(_num(before.get('perplexity')))} -> {_plain(_num(after.get('perplexity')))}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = (
        f"before: step {first.get('step', 0)}, after: step {last.get('step', '?')} "
        f"({last.get('ff_pruned') or 0} FF neurons, {last.get('attn_pruned') or 0} attention neurons pruned)"
    )
    return "\n".join([title, *lines])


def format_step_line(report: Mapping[str, Any], steps: int | None = None) -> str:
    """One line per completed step: pruned counts and top-1 of each eval set, with its drop."""
    step = report.get("step", "?")
    where = f"step {step}/{steps}" if steps else f"step {step}"
    if not report.get("accepted", True):
        budget = report.get("budget") or {}
        fracs = f"FF {_pct(_num(report.get('ff_frac')))}, attn {_pct(_num(report.get('attn_frac')))}"
        broken = "; ".join(budget.get("broken") or []) or "over budget"
        return f"{where}: trial {report.get('trial', 0)} at {fracs} per step rejected ({broken}); retrying smaller"
    parts = [f"{where}: {report.get('ff_pruned') or 0} FF / {report.get('attn_pruned') or 0} attn pruned"]
    metrics = report.get("metrics") or {}
    drops = report.get("drops") or {}
    for name in _set_names(report, report):
        text = f"{name} top-1 {_pct(_num((metrics.get(name) or {}).get('top1')))}"
        drop = _num(drops.get(name))
        if drop is not None and step != 0:
            text += f" (drop {_pct(drop)})"
        parts.append(text)
    return " | ".join(parts)


def write_line(text: str, file: TextIO | None = None) -> None:
    """Write a line without tearing an active progress bar."""
    tqdm.write(text, file=file or sys.stdout)


# --- the local job context ------------------------------------------------------------------------------
class ConsoleContext:
    """worker.context.JobContext for `selprune prune`: progress on the console, masks as files.

    Steps and the checkpoint stay in memory (a local run does not resume); `store_mask` writes
    `<out_dir>/<mask_id>.safetensors` and `<mask_id>.json`. Ctrl-C aborts, so `should_cancel` is False.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        phase_totals: Mapping[str, int] | None = None,
        file: TextIO | None = None,
        show_progress: bool | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.steps: list[dict[str, Any]] = []
        self.mask_id: str | None = None
        self.mask_path: Path | None = None
        self._checkpoint: bytes | None = None
        self._phase_totals = dict(phase_totals or {})
        self._file = file
        # None: bars only on a terminal (tqdm's rule); step lines are always written.
        self._disable = None if show_progress is None else not show_progress
        self._bar: tqdm[Any] | None = None
        self._bar_key: tuple[int, str] | None = None
        self._n_steps = 0
        self.clock = PhaseClock()

    # JobContext ------------------------------------------------------------------------------------
    def progress(self, progress: JobProgress) -> None:
        self._n_steps = progress.steps or self._n_steps
        self.clock.enter(None if progress.phase == "done" else progress.phase)
        key = (progress.step, progress.phase)
        if key != self._bar_key:
            self.close()
            self._bar_key = key
            if progress.phase == "done":
                return
            total = self._phase_totals.get(progress.phase)
            self._bar = tqdm(
                desc=f"step {progress.step}/{progress.steps} {phase_label(progress.phase)}",
                total=total,
                unit="tok",
                unit_scale=True,
                leave=False,
                disable=self._disable,
                file=sys.stderr,
                # Phases without a token budget (loading, evaluating, scoring) show elapsed time only.
                bar_format=None if total else "{desc}: {elapsed}",
            )
        if self._bar is not None and progress.tokens:
            self._bar.update(progress.tokens - self._bar.n)

    def step_done(self, report: dict[str, Any], checkpoint: bytes) -> None:
        self.close()
        self.steps.append(report)
        self._checkpoint = checkpoint
        write_line(format_step_line(report, self._n_steps), self._file)

    def completed_steps(self) -> list[dict[str, Any]]:
        return list(self.steps)

    def checkpoint(self) -> bytes | None:
        return self._checkpoint

    def should_cancel(self) -> bool:
        return False

    def store_mask(self, mask_bytes: bytes, meta: dict[str, Any]) -> str:
        from selprune_core.masks import NeuronMask  # torch: only a local run gets here

        mask = NeuronMask.from_bytes(mask_bytes)
        self.mask_path = mask.save(self.out_dir, meta)
        self.mask_id = mask.mask_id
        return mask.mask_id

    def load_mask(self, mask_id: str) -> bytes:
        from worker.errors import MaskNotFoundError

        path = self.out_dir / f"{mask_id}.safetensors"
        if not path.is_file():
            raise MaskNotFoundError(f"no mask {mask_id} in {self.out_dir}")
        return path.read_bytes()

    # ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the open progress bar, if any."""
        if self._bar is not None:
            self._bar.close()
        self._bar, self._bar_key = None, None


# --- following a remote job -----------------------------------------------------------------------------
def follow_events(
    events: Iterable[tuple[str, Any]], *, file: TextIO | None = None, show_progress: bool | None = None
) -> dict[str, Any] | None:
    """Show a job's event stream: a bar over pruning steps, the phase, one line per step, and at the
    end the time spent in each phase.

    Returns the data of the last `state` event (None if the stream ended without one).
    """
    clock = PhaseClock()
    bar: tqdm[Any] = tqdm(
        total=None, unit="step", disable=None if show_progress is None else not show_progress, file=sys.stderr
    )
    last_state: dict[str, Any] | None = None
    steps: int | None = None
    try:
        for event, data in events:
            if not isinstance(data, dict):
                continue
            if isinstance(data.get("steps"), int) and data["steps"] and data["steps"] != bar.total:
                steps = data["steps"]
                bar.total = steps
                bar.refresh()
            if event == "step":
                bar.update(max(0, int(data.get("step") or 0) - bar.n))
                write_line(format_step_line(data, steps), file)
            elif event == "state":
                last_state = data
                state = str(data.get("state", ""))
                clock.enter(state if state in ("queued", "running") else None)
                bar.set_description_str(state)
            else:  # progress (or a polled status)
                clock.enter(None if data.get("phase") == "done" else str(data.get("phase", "")))
                phase = phase_label(str(data.get("phase", "")))
                tokens = data.get("tokens") or 0
                bar.set_description_str(phase)
                bar.set_postfix_str(f"{tokens:,} tok" if tokens else "", refresh=False)
                bar.refresh()
    finally:
        bar.close()
    summary = clock.summary()
    if summary:
        write_line(summary, file)
    return last_state
