"""worker/plots.py: drop points from step reports and PNG rendering (real matplotlib, Agg canvas)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worker.plots import Curve, drop_points, render_job_plot, render_tradeoff

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def step(n: int, forget_top1: float, retain_top1: float, *, base=(0.5, 0.4), ci: float = 0.02) -> dict:
    """A step report as StepReport.as_dict() leaves it (only the fields the plot reads matter)."""

    def metrics(top1: float) -> dict:
        return {"top1": top1, "loss": 2.0, "ci": {"top1": [top1 - ci, top1 + ci]}}

    return {
        "step": n,
        "ff_pruned": 10 * n,
        "metrics": {"forget": metrics(forget_top1), "retain": metrics(retain_top1)},
        "drops": {"forget": (base[0] - forget_top1) / base[0], "retain": (base[1] - retain_top1) / base[1]},
    }


STEPS = [step(0, 0.5, 0.4), step(1, 0.3, 0.39), step(2, 0.1, 0.37)]


def test_drop_points_convert_accuracy_intervals_into_drop_intervals():
    points = drop_points(STEPS)
    assert [p.step for p in points] == [0, 1, 2]
    assert points[0].forget == 0.0 and points[0].retain == 0.0
    assert points[2].forget == pytest.approx(0.8)
    # top-1 0.1 +- 0.02 against a step-0 accuracy of 0.5: drop between 0.76 and 0.84
    assert points[2].forget_ci == pytest.approx((0.76, 0.84))
    lo, hi = points[1].retain_ci
    assert lo < points[1].retain < hi


def test_reports_without_intervals_or_drops_are_tolerated():
    bare = [{"step": 0, "drops": {"forget": 0.0, "retain": 0.0}, "metrics": {}}, {"step": 1, "metrics": {}}]
    points = drop_points(bare)
    assert len(points) == 1 and points[0].forget_ci is None
    assert render_job_plot(bare).startswith(PNG_MAGIC)


@pytest.mark.parametrize("n_steps", [1, 2, 3])
def test_job_plot_is_a_png_for_one_or_more_steps(n_steps):
    png = render_job_plot(STEPS[:n_steps], title="tiny job")
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_selective_and_baseline_curves_share_a_plot():
    random = [step(0, 0.5, 0.4), step(1, 0.45, 0.36), step(2, 0.4, 0.33)]
    png = render_tradeoff(
        [Curve("FF abs", STEPS, group="ff"), Curve("FF random", random, baseline=True, group="ff")],
        title="selective vs random",
        forget_label="code",
        retain_label="prose",
    )
    assert png.startswith(PNG_MAGIC)


def test_an_empty_curve_list_still_renders():
    assert render_tradeoff([]).startswith(PNG_MAGIC)


def test_importing_the_module_does_not_load_matplotlib():
    code = "import sys, worker.plots; assert 'matplotlib' not in sys.modules, 'matplotlib loaded eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
