"""The sections of docs/results.md about keeping the model: how the defaults were chosen (validation
split), how they do on held-out texts against the paper's recipe and matched random pruning, the
budgeted demo job (the toxicity recipe is bench/detox_report.py). Generated from the run JSON alone,
like the rest.

The operating-point metric is declared here once and used for every table: the forget drop a run
reaches while its retain drop stays at or below a limit, read two ways:
- *measured*: the best step whose retain drop is within the limit (no interpolation);
- *interpolated*: linear along the curve to where the retain drop crosses the limit (for ranking
  recipes, whose steps land at different retain drops).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.fidelity_tables import pct, table
from protocol import RECIPES
from worker.plots import Curve, DropPoint, drop_points, render_tradeoff

Run = Mapping[str, Any]

RETAIN_LIMIT = 0.05  # the operating point: retain top-1 drop of at most 5%
FORGET_TARGET = 0.50  # ... with a forget top-1 drop of at least 50%
DEMO_PPL_LIMIT = 0.10  # the default demo job: retain perplexity at most +10%
DEMO_FORGET_TARGET = 0.60  # ... and a forget top-1 drop of at least 60%


def plot(
    out: Path, name: str, runs: Mapping[str, Run], title: str, forget_label: str, retain_label: str
) -> str:
    """results/<name>.png: one curve per run, labelled by run name; random runs dashed."""
    curves = [
        Curve(run_name, run["steps"], baseline=bool(run["spec"].get("random")))
        for run_name, run in runs.items()
        if run["steps"]
    ]
    png = render_tradeoff(curves, title=title, forget_label=forget_label, retain_label=retain_label)
    (out / "results" / f"{name}.png").write_bytes(png)
    return f"![{title}](results/{name}.png)"


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
    for name, settings in RECIPES.items():
        if recipe == settings:
            return f"recipe={name}"
    return ", ".join(f"{k}={v}" for k, v in recipe.items()) or "paper (abs, zero ablation)"


def comparison(exp: Mapping[str, Any], ours: str, paper: str) -> list[str]:
    """The default against the paper's recipe, in numbers computed from the runs."""
    runs = exp["runs"]
    if ours not in runs or paper not in runs:
        return []
    a, b = runs[ours], runs[paper]
    at_a, at_b = measured_at(a), measured_at(b)
    fa, fb = last_accepted(a), last_accepted(b)
    first = {
        name: accepted_points(run)[1]
        for name, run in ((ours, a), (paper, b))
        if len(accepted_points(run)) > 1
    }
    lines = [
        f"Default against the paper's recipe: after the first 2% step the retain drop is "
        f"{pct(first[ours].retain)} vs {pct(first[paper].retain)} at a forget drop of {pct(first[ours].forget)} vs "
        f"{pct(first[paper].forget)}; at a retain drop of at most {RETAIN_LIMIT:.0%} the best measured step "
        f"reaches a forget drop of {pct(at_a.forget) if at_a else 'none'} vs {pct(at_b.forget) if at_b else 'none'} "
        f"(interpolated {pct(interpolated_at(a))} vs {pct(interpolated_at(b))}); after the last step retain "
        f"perplexity is {(ppl_increase(a, fa) or 0) * 100:+.0f}% vs {(ppl_increase(b, fb) or 0) * 100:+.0f}%.",
        "",
    ]
    return lines


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
        *quota_note(runs),
        plot(
            out,
            "recipes_val",
            {k: v for k, v in runs.items() if "taylor" not in k},  # off the scale: see the table
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
            runs,
            "held-out: forget python_code, retain english_prose",
            "python_code (forget)",
            "english_prose (retain)",
        ),
        "",
    ]
    lines += quota_note(runs)
    return lines + comparison(exp, "keep_selprune", "keep_paper") + section_heldout_targets(exp) + [""]


def quota_note(runs: Mapping[str, Run]) -> list[str]:
    """Per-layer runs recorded before per-layer quotas split the global count: say what differs."""
    notes = []
    for name, run in runs.items():
        recipe = dict(run["spec"].get("recipe") or ())
        steps = [r for r in run["steps"] if r.get("step", 0) > 0 and r.get("accepted", True)]
        if recipe.get("selection") != "per_layer" or not steps or run["spec"].get("random"):
            continue
        first = steps[0]
        now = math.floor(first["ff_frac"] * run["totals"]["ff"]) if first.get("ff_frac") else None
        if now is not None and first["ff_selected"] != now:
            notes.append(
                f"{name} selected {first['ff_selected']} FF neurons at its first step; the current code selects {now}"
            )
    if not notes:
        return []
    return [
        "These per-layer runs used the first version of the quota, floor(frac x d) per layer, which rounds "
        "away up to one neuron per layer; the current code splits floor(frac x N) over the layers "
        f"({'; '.join(notes)}). Rerunning the command gives slightly larger steps.",
        "",
    ]


def section_heldout_targets(exp: Mapping[str, Any]) -> list[str]:
    """The issue's operating-point target for every selective held-out run (measured steps only)."""
    lines = []
    for name, run in exp["runs"].items():
        if run["spec"].get("random"):
            continue
        at = measured_at(run)
        forget = at.forget if at else 0.0
        verdict = "met" if forget >= FORGET_TARGET else "missed"
        where = f"step {at.step}, retain drop {pct(at.retain)}" if at else "no step within the limit"
        lines.append(
            f"- {name}: forget drop {pct(forget)} at a retain drop of at most {RETAIN_LIMIT:.0%} ({where}; "
            f"target >= {FORGET_TARGET:.0%}): **{verdict}**."
        )
    return lines


BUDGET_INTRO = [
    "## The default demo job under its retain budget (held-out texts)",
    "",
    "`selprune demo` submits the default recipe with `steps: 10` and the budget `max_retain_ppl_increase: "
    "0.1, forget_target: 0.6`, checked on a validation carve-out of the train texts. Here the same settings "
    "run with this document's statistics and evaluation budgets (the demo job itself uses the service "
    "defaults: 10,000 statistics tokens, 5,000 evaluation predictions, 512-token texts); every number is "
    "on held-out texts.",
    "",
]


def section_budget(exp: Mapping[str, Any]) -> list[str]:
    return [*BUDGET_INTRO, *budget_bullets(exp), ""]


def budget_bullets(exp: Mapping[str, Any]) -> list[str]:
    """One line per budgeted run: where it stopped and the demo targets, met or missed."""
    lines: list[str] = []
    for name, run in exp["runs"].items():
        final = last_accepted(run)
        point = {p.step: p for p in accepted_points(run)}.get(final["step"])
        rejected = [r for r in run["steps"] if not r.get("accepted", True)]
        inc = ppl_increase(run, final)
        forget = point.forget if point else 0.0
        ok = inc is not None and inc <= DEMO_PPL_LIMIT and forget >= DEMO_FORGET_TARGET
        lines.append(
            f"- {name} ({recipe_text(run)}; budget {run['spec'].get('budget')}): stopped "
            f"({run.get('stopped_reason')}) after step {final['step']}, {len(rejected)} trial(s) rejected; "
            f"held-out retain perplexity {inc * 100 if inc is not None else float('nan'):+.1f}% "
            f"(target <= +{DEMO_PPL_LIMIT:.0%}), forget drop {pct(forget)} (target >= {DEMO_FORGET_TARGET:.0%}), "
            f"retain drop {pct(point.retain) if point else '–'}: **{'met' if ok else 'missed'}**."
        )
    return lines
