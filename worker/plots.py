"""The forget-vs-retain trade-off plot (the paper's Figure 2) rendered from step reports.

One point per pruning step: x is the retain set's relative top-1 drop, y the forget set's, both
against step 0, so step 0 sits at the origin and a good run climbs steeply along y. Error bars are the
95% bootstrap interval of that step's top-1 accuracy (EvalResult.ci) divided by the step-0 accuracy;
step 0's own uncertainty is not propagated (the intervals are per step, not paired).

Steps a retain budget rejected have no held-out drops (they were measured on the validation split
only); they are drawn as crosses at their validation drops, so every tried step shows.

Used by the worker (a PNG per job, re-rendered after every step), by `selprune prune` (a PNG next to
the mask) and by bench/fidelity.py. matplotlib is imported only when a plot is drawn, through its
object API (Figure + Agg canvas), so no global backend state is touched and the gateway never loads it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Curve", "DropPoint", "drop_points", "rejected_points", "render_tradeoff", "render_job_plot"]

FORGET, RETAIN = "forget", "retain"  # the eval-set names run_prune gives its forget and retain sets


@dataclass(frozen=True)
class DropPoint:
    step: int
    forget: float  # relative top-1 drop, (acc_0 - acc_i) / acc_0
    retain: float
    forget_ci: tuple[float, float] | None  # 95% interval of the drop, None when the report has no CI
    retain_ci: tuple[float, float] | None


@dataclass(frozen=True)
class Curve:
    """A labelled trajectory: step reports (StepReport.as_dict()) in step order."""

    label: str
    steps: Sequence[Mapping[str, Any]]
    baseline: bool = False  # a random-pruning baseline: drawn dashed
    group: str = ""  # curves of one group share a colour (a run and its baseline); default: the label


def _top1(report: Mapping[str, Any], name: str) -> float | None:
    value = report.get("metrics", {}).get(name, {}).get("top1")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _drop_ci(report: Mapping[str, Any], name: str, base: float | None) -> tuple[float, float] | None:
    ci = report.get("metrics", {}).get(name, {}).get("ci", {}).get("top1")
    if not base or not isinstance(ci, list | tuple) or len(ci) != 2 or None in ci:
        return None
    lo, hi = float(ci[0]), float(ci[1])
    return (base - hi) / base, (base - lo) / base  # a higher accuracy is a lower drop


def drop_points(
    steps: Sequence[Mapping[str, Any]], *, forget: str = FORGET, retain: str = RETAIN
) -> list[DropPoint]:
    """Drops per step; reports missing either set's drop are skipped."""
    step0 = next((r for r in steps if r.get("step") == 0), None)
    bases = {name: _top1(step0, name) if step0 else None for name in (forget, retain)}
    points: list[DropPoint] = []
    for report in steps:
        drops = report.get("drops", {})
        f, r = drops.get(forget), drops.get(retain)
        if not isinstance(f, int | float) or not isinstance(r, int | float):
            continue
        if not (math.isfinite(f) and math.isfinite(r)):
            continue
        points.append(
            DropPoint(
                step=int(report.get("step", len(points))),
                forget=float(f),
                retain=float(r),
                forget_ci=_drop_ci(report, forget, bases[forget]),
                retain_ci=_drop_ci(report, retain, bases[retain]),
            )
        )
    return points


def rejected_points(steps: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """(retain drop, forget drop) on the budget's validation sets of every rejected trial."""
    out = []
    for report in steps:
        budget = report.get("budget") or {}
        f, r = budget.get("forget_drop"), budget.get("retain_drop")
        if report.get("accepted", True) or not isinstance(f, int | float) or not isinstance(r, int | float):
            continue
        out.append((float(r), float(f)))
    return out


def _err(values: Sequence[float], cis: Sequence[tuple[float, float] | None]) -> list[list[float]]:
    # matplotlib wants non-negative distances below and above each point.
    below = [max(0.0, v - ci[0]) if ci else 0.0 for v, ci in zip(values, cis, strict=True)]
    above = [max(0.0, ci[1] - v) if ci else 0.0 for v, ci in zip(values, cis, strict=True)]
    return [below, above]


def render_tradeoff(
    curves: Sequence[Curve],
    *,
    title: str = "",
    forget: str = FORGET,
    retain: str = RETAIN,
    forget_label: str = "forget set",
    retain_label: str = "retain set",
) -> bytes:
    """PNG bytes of forget drop (y) vs retain drop (x), one marker per step, one line per curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    color_of: dict[str, str] = {}
    for curve in curves:
        points = drop_points(curve.steps, forget=forget, retain=retain)
        if not points:
            continue
        key = curve.group or curve.label
        color = color_of.setdefault(key, colors[len(color_of) % len(colors)])
        xs = [p.retain for p in points]
        ys = [p.forget for p in points]
        ax.errorbar(
            xs,
            ys,
            xerr=_err(xs, [p.retain_ci for p in points]),
            yerr=_err(ys, [p.forget_ci for p in points]),
            label=curve.label,
            color=color,
            linestyle="--" if curve.baseline else "-",
            marker="s" if curve.baseline else "o",
            markersize=4,
            capsize=2,
            elinewidth=0.8,
            alpha=0.75 if curve.baseline else 1.0,
        )
        if rejected := rejected_points(curve.steps):
            ax.scatter(
                [r for r, _ in rejected],
                [f for _, f in rejected],
                marker="x",
                color=color,
                label=f"{curve.label}: rejected (validation drops)",
            )
    ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle=":", label="equal drop")
    ax.set_xlabel(f"relative top-1 drop, {retain_label}")
    ax.set_ylabel(f"relative top-1 drop, {forget_label}")
    lo_x, hi_x = ax.get_xlim()
    lo_y, hi_y = ax.get_ylim()
    ax.set_xlim(min(lo_x, -0.02), max(hi_x, 0.1))
    ax.set_ylim(min(lo_y, -0.02), max(hi_y, 0.1))
    ax.grid(True, linewidth=0.4, alpha=0.5)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def render_job_plot(steps: Sequence[Mapping[str, Any]], *, title: str = "") -> bytes:
    """The plot of one prune job, from its step reports (the job's steps list)."""
    return render_tradeoff([Curve("selective pruning", steps)], title=title)
