"""The sections of docs/results.md about keeping the model: how the defaults were chosen (validation
split), how they do on held-out texts against the paper's recipe and matched random pruning, the
budgeted demo job, and the toxicity recipe. Generated from the run JSON alone, like the rest.

The operating-point metric is declared here once and used for every table: the forget drop a run
reaches while its retain drop stays at or below a limit, read two ways:
- *measured*: the best step whose retain drop is within the limit (no interpolation);
- *interpolated*: linear along the curve to where the retain drop crosses the limit (for ranking
  recipes, whose steps land at different retain drops).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.fidelity_tables import pct, plot, table
from worker.plots import DropPoint, drop_points

Run = Mapping[str, Any]

RETAIN_LIMIT = 0.05  # the operating point: retain top-1 drop of at most 5%
FORGET_TARGET = 0.50  # ... with a forget top-1 drop of at least 50%
DEMO_PPL_LIMIT = 0.10  # the default demo job: retain perplexity at most +10%
DEMO_FORGET_TARGET = 0.60  # ... and a forget top-1 drop of at least 60%


def accepted_points(run: Run) -> list[DropPoint]:
    return sorted(drop_points(run["steps"]), key=lambda p: p.step)


def measured_at(run: Run, limit: float = RETAIN_LIMIT) -> DropPoint | None:
    """The step with the highest forget drop among those whose retain drop is within `limit`."""
    within = [p for p in accepted_points(run) if p.step > 0 and p.retain <= limit]
    return max(within, key=lambda p: p.forget, default=None)


def interpolated_at(run: Run, limit: float = RETAIN_LIMIT) -> float | None:
    """Forget drop where the curve first crosses `limit` in retain drop, linear between steps; the
    last step's forget drop if it never does; None without steps."""
    pts = accepted_points(run)
    for a, b in zip(pts, pts[1:], strict=False):
        if a.retain <= limit < b.retain:
            t = (limit - a.retain) / (b.retain - a.retain)
            return a.forget + t * (b.forget - a.forget)
    return pts[-1].forget if pts and pts[-1].retain <= limit else None


def ppl(report: Mapping[str, Any], name: str = "retain") -> float | None:
    value = report.get("metrics", {}).get(name, {}).get("perplexity")
    return float(value) if isinstance(value, int | float) else None


def ppl_increase(run: Run, report: Mapping[str, Any], name: str = "retain") -> float | None:
    base, now = ppl(run["steps"][0], name), ppl(report, name)
    return None if base is None or now is None else now / base - 1.0


def last_accepted(run: Run) -> Mapping[str, Any]:
    return [r for r in run["steps"] if r.get("accepted", True)][-1]


def recipe_text(run: Run) -> str:
    recipe = dict(run["spec"].get("recipe") or ())
    if run["spec"].get("random"):
        return f"random (seed {run['spec'].get('seed') or 0}, counts of {run['spec'].get('match')})"
    return ", ".join(f"{k}={v}" for k, v in recipe.items()) or "paper (abs, zero ablation)"


def recipe_rows(exp: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, run in exp["runs"].items():
        at = measured_at(run)
        final = last_accepted(run)
        point = {p.step: p for p in accepted_points(run)}.get(final["step"])
        rows.append(
            [
                name,
                recipe_text(run),
                pct(interpolated_at(run)),
                f"{pct(at.forget)} (step {at.step}, retain {pct(at.retain)})" if at else "no step within",
                f"{final['step']}",
                pct(point.forget) if point else "–",
                pct(point.retain) if point else "–",
                f"{(ppl_increase(run, final) or 0) * 100:+.0f}%",
            ]
        )
    return rows


RECIPE_HEADER = [
    "run",
    "settings",
    f"forget drop at {RETAIN_LIMIT:.0%} retain drop (interpolated)",
    f"best step with retain drop <= {RETAIN_LIMIT:.0%}",
    "last step",
    "forget drop",
    "retain drop",
    "retain perplexity",
]


def section_validation(out: Path, exp: Mapping[str, Any], extra: Sequence[Mapping[str, Any]]) -> list[str]:
    runs = {**exp["runs"], **{k: v for e in extra for k, v in e["runs"].items()}}
    merged = {**exp, "runs": runs}
    lines = [
        "## Choosing the defaults (validation split)",
        "",
        "Forget `python_code`, retain `english_prose`, FF neurons at 2% per step. Statistics come from the "
        "train texts minus a validation carve-out (`carve_validation`: one text in ten by a salted hash), "
        "and every number in this section is measured on that carve-out; held-out texts were not read. "
        "The rule, fixed before the runs: rank by the forget drop at a 5% retain drop (interpolated along "
        "the curve); treat differences under 5 points as ties (the validation sets are small: 80 code and "
        "36 prose texts) and break ties by the retain perplexity at the last step.",
        "",
        *table(RECIPE_HEADER, recipe_rows(merged)),
        plot(
            out,
            "recipes_val",
            list(runs.values()),
            "validation: forget python_code, retain english_prose",
            "python_code (forget)",
            "english_prose (retain)",
        ),
        "",
    ]
    return lines


def section_heldout(out: Path, exp: Mapping[str, Any]) -> list[str]:
    runs = exp["runs"]
    lines = [
        "## Unlearning that keeps the model (held-out texts)",
        "",
        "The same pair on the held-out texts: the paper's recipe, each change alone, the combination that "
        "became the default (`recipe=selprune`), and random pruning with the default's per-layer counts at "
        "every step (3 seeds).",
        "",
        *table(RECIPE_HEADER, recipe_rows(exp)),
        plot(
            out,
            "keep",
            list(runs.values()),
            "held-out: forget python_code, retain english_prose",
            "python_code (forget)",
            "english_prose (retain)",
        ),
        "",
    ]
    target_lines = []
    for name, run in runs.items():
        if run["spec"].get("random") or run["spec"].get("recipe") is None and name != "keep_paper":
            continue
        at = measured_at(run)
        forget = at.forget if at else 0.0
        verdict = "met" if forget >= FORGET_TARGET else "missed"
        target_lines.append(
            f"- {name}: forget drop {pct(forget)} at a retain drop of at most {RETAIN_LIMIT:.0%} "
            f"(target >= {FORGET_TARGET:.0%}): **{verdict}**."
        )
    return lines + target_lines + [""]


def section_budget(exp: Mapping[str, Any]) -> list[str]:
    lines = ["## The default demo job under its retain budget (held-out texts)", ""]
    for name, run in exp["runs"].items():
        final = last_accepted(run)
        point = {p.step: p for p in accepted_points(run)}.get(final["step"])
        rejected = [r for r in run["steps"] if not r.get("accepted", True)]
        inc = ppl_increase(run, final)
        forget = point.forget if point else 0.0
        ok = inc is not None and inc <= DEMO_PPL_LIMIT and forget >= DEMO_FORGET_TARGET
        lines += [
            f"- {name} ({recipe_text(run)}; budget {run['spec'].get('budget')}): stopped "
            f"({run.get('stopped_reason')}) after step {final['step']}, {len(rejected)} trial(s) rejected; "
            f"held-out retain perplexity {inc * 100 if inc is not None else float('nan'):+.1f}% "
            f"(target <= +{DEMO_PPL_LIMIT:.0%}), forget drop {pct(forget)} (target >= {DEMO_FORGET_TARGET:.0%}), "
            f"retain drop {pct(point.retain) if point else '–'}: **{'met' if ok else 'missed'}**.",
        ]
    return lines + [""]
