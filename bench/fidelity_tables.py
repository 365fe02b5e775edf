"""Tables, run accessors and verdicts for bench/fidelity_report.py, computed from run JSON alone.

A run is the dict bench/fidelity_runner.py writes (spec, budget, totals, steps =
StepReport.as_dict()). Drops and their intervals come from worker/plots.drop_points, the same code
that draws the plots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.experiments import EXPERIMENTS
from worker.plots import Curve, DropPoint, drop_points, render_tradeoff

Run = Mapping[str, Any]


# --- small formatting helpers ----------------------------------------------------------------------------
def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def pct_ci(x: float | None, ci: Sequence[float] | None, digits: int = 1) -> str:
    if ci is None or x is None:
        return pct(x, digits)
    return f"{pct(x, digits)} [{pct(ci[0], digits)}, {pct(ci[1], digits)}]"


def num_ci(x: float | None, ci: Sequence[float | None] | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    if not ci or None in ci:
        return f"{x:.{digits}f}"
    return f"{x:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


# --- run accessors ---------------------------------------------------------------------------------------
def points(run: Run) -> dict[int, DropPoint]:
    return {p.step: p for p in drop_points(run["steps"])}


def fraction(run: Run, report: Mapping[str, Any]) -> tuple[float, float]:
    totals = run["totals"]
    return report["ff_pruned"] / totals["ff"], report["attn_pruned"] / totals["attn"]


def frac_label(run: Run, report: Mapping[str, Any]) -> str:
    ff, attn = fraction(run, report)
    parts = [
        f"FF {pct(ff, 2)}" if run["spec"]["ff_frac"] else "",
        f"attn {pct(attn, 2)}" if run["spec"]["attn_frac"] else "",
    ]
    return ", ".join(p for p in parts if p)


def component(spec: Mapping[str, Any]) -> str:
    return {(True, False): "FF", (False, True): "attention", (True, True): "FF + attention"}[
        (spec["ff_frac"] > 0, spec["attn_frac"] > 0)
    ]


def per_step(spec: Mapping[str, Any]) -> str:
    return f"{100 * max(spec['ff_frac'], spec['attn_frac']):g}%/step"


def collect_tokens(run: Run) -> int:
    return int(run["spec"].get("collect_tokens") or run["budget"]["collect_tokens"])


def label(run: Run) -> str:
    spec = run["spec"]
    if spec["random"]:
        return f"{component(spec)}, random, {per_step(spec)}"
    extra = f", {collect_tokens(run)} statistics tokens" if spec.get("collect_tokens") else ""
    return f"{component(spec)}, {spec['scoring']}, {per_step(spec)}{extra}"


def curve_forget_at(rand_points: Sequence[DropPoint], retain: float) -> float | None:
    """The random curve's forget drop at this retain drop (linear between its steps); None outside
    the retain range the random run reached (no extrapolation)."""
    pts = sorted(rand_points, key=lambda p: p.retain)
    for a, b in zip(pts, pts[1:], strict=False):
        if a.retain <= retain <= b.retain:
            if b.retain == a.retain:
                return max(a.forget, b.forget)
            t = (retain - a.retain) / (b.retain - a.retain)
            return a.forget + t * (b.forget - a.forget)
    return None


def separation_verdict(sel: Run, rand: Run) -> dict[str, Any]:
    """Selective vs random, step by step at the same fractions, and in the (retain, forget) plane."""
    ps, pr = points(sel), points(rand)
    steps = sorted(s for s in ps if s > 0 and s in pr)
    above = [s for s in steps if ps[s].forget - ps[s].retain > pr[s].forget - pr[s].retain]
    clear = [
        s for s in steps if ps[s].forget_ci and pr[s].forget_ci and ps[s].forget_ci[0] > pr[s].forget_ci[1]
    ]
    costlier = [s for s in steps if ps[s].retain > pr[s].retain]
    curve = {s: curve_forget_at(list(pr.values()), ps[s].retain) for s in ps if s > 0}
    compared = [s for s, f in curve.items() if f is not None]
    curve_above = [s for s in compared if ps[s].forget > (curve[s] or 0.0)]
    return {
        "steps": steps,
        "above": above,
        "clear": clear,
        "costlier": costlier,
        "curve_compared": compared,
        "curve_above": curve_above,
        "curve_outside": len(curve) - len(compared),
    }


def verdict_text(name: str, v: Mapping[str, Any]) -> str:
    n = len(v["steps"])
    if n == 0:
        return f"{name}: no step to compare yet."
    every = "at every fraction" if len(v["above"]) == n else f"at {len(v['above'])} of {n} fractions"
    m = len(v["curve_compared"])
    curve = (
        f"in the retain-drop/forget-drop plane the selective point lies above the random curve at "
        f"{len(v['curve_above'])} of the {m} steps whose retain drop the random run also reached"
        if m
        else "no selective step has a retain drop inside the random run's range"
    )
    outside = f" ({v['curve_outside']} beyond it)" if v["curve_outside"] else ""
    return (
        f"{name}: selective separation (forget drop minus retain drop) exceeds random's {every}; the "
        f"selective forget-drop 95% interval lies entirely above random's at {len(v['clear'])} of {n}; "
        f"{curve}{outside}. The price: at the same fraction the selective retain drop is higher than "
        f"random's at {len(v['costlier'])} of {n}."
    )


def step_table(sel: Run, rand: Run | None) -> list[str]:
    ps = points(sel)
    pr = points(rand) if rand else {}
    header = [
        "step",
        "pruned",
        "forget top-1 [95% CI]",
        "retain top-1 [95% CI]",
        "forget drop",
        "retain drop",
    ]
    if rand:
        header += ["random: pruned", "random: forget drop", "random: retain drop"]
    rand_reports = {r["step"]: r for r in rand["steps"]} if rand else {}
    rows = []
    for report in sel["steps"]:
        s = report["step"]
        f, r = report["metrics"]["forget"], report["metrics"]["retain"]
        row = [
            str(s),
            frac_label(sel, report) or "0",
            pct_ci(f["top1"], f["ci"].get("top1")),
            pct_ci(r["top1"], r["ci"].get("top1")),
            pct_ci(ps[s].forget, ps[s].forget_ci) if s in ps else "–",
            pct_ci(ps[s].retain, ps[s].retain_ci) if s in ps else "–",
        ]
        if rand:
            row += [
                frac_label(rand, rand_reports[s]) if s in rand_reports else "not run",
                pct_ci(pr[s].forget, pr[s].forget_ci) if s in pr else "not run",
                pct_ci(pr[s].retain, pr[s].retain_ci) if s in pr else "not run",
            ]
        rows.append(row)
    return table(header, rows)


def plot(
    out: Path,
    name: str,
    runs: Sequence[Run],
    title: str,
    forget_label: str,
    retain_label: str,
    group_of: Mapping[str, str] | None = None,
) -> str:
    """Write results/<name>.png; `group_of` maps run names to colour groups (run and its baseline)."""
    group_of = dict(group_of or {})
    curves = [
        Curve(label(r), r["steps"], baseline=r["spec"]["random"], group=group_of.get(r["run"], r["run"]))
        for r in runs
        if r["steps"]
    ]
    png = render_tradeoff(curves, title=title, forget_label=forget_label, retain_label=retain_label)
    (out / "results" / f"{name}.png").write_bytes(png)
    return f"![{title}](results/{name}.png)"


def ordered(exp: Mapping[str, Any]) -> list[Run]:
    """The experiment's runs in the order bench/experiments.py plans them (the JSON sorts its keys)."""
    plan = [spec.name for spec in EXPERIMENTS.get(exp["experiment"], [])]
    return sorted(exp["runs"].values(), key=lambda r: plan.index(r["run"]) if r["run"] in plan else len(plan))


def pairs(exp: Mapping[str, Any]) -> list[tuple[Run, Run | None]]:
    """(selective, its random baseline) in the experiment's order; the baseline of an FF run with
    the same fractions is shared by every importance function."""
    runs = ordered(exp)
    out: list[tuple[Run, Run | None]] = []
    for run in runs:
        if run["spec"]["random"]:
            continue
        spec = run["spec"]
        match = [
            r
            for r in runs
            if r["spec"]["random"]
            and (r["spec"]["forget"], r["spec"]["ff_frac"], r["spec"]["attn_frac"])
            == (spec["forget"], spec["ff_frac"], spec["attn_frac"])
        ]
        out.append((run, match[0] if match else None))
    return out


def last_common(sel: Run, rand: Run | None) -> int:
    ps = points(sel)
    steps = [s for s in ps if rand is None or s in points(rand)]
    return max(steps, default=0)


def summary_rows(exp: Mapping[str, Any], *, what: str) -> list[list[str]]:
    """One row per selective run at its last step that its baseline also reached."""
    rows = []
    for sel, rand in pairs(exp):
        s = last_common(sel, rand)
        report = next(r for r in sel["steps"] if r["step"] == s)
        p = points(sel).get(s)
        q = points(rand).get(s) if rand else None
        v = separation_verdict(sel, rand) if rand else {"steps": [], "above": [], "clear": []}
        rows.append(
            [
                {
                    "steps": f"{per_step(sel['spec'])} x {s}",
                    "forget": f"forget {sel['spec']['forget']}",
                    "collect": f"{collect_tokens(sel)} statistics tokens per set per step",
                }.get(what, label(sel)),
                frac_label(sel, report),
                pct_ci(p.forget, p.forget_ci) if p else "–",
                pct_ci(p.retain, p.retain_ci) if p else "–",
                pct(p.forget - p.retain) if p else "–",
                pct(q.forget - q.retain) if q else "not run",
                f"{len(v['above'])}/{len(v['steps'])}",
                f"{len(v['clear'])}/{len(v['steps'])}",
                f"{sel.get('wall_s', 0):.0f} s" + (f" + {rand.get('wall_s', 0):.0f} s" if rand else ""),
            ]
        )
    return rows


SUMMARY_HEADER = [
    "run",
    "pruned (cumulative)",
    "forget drop [95% CI]",
    "retain drop [95% CI]",
    "separation",
    "random separation",
    "steps with separation > random",
    "steps with forget CI above random's",
    "wall (selective + random)",
]


def toxicity_rows(exp: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for sel, rand in pairs(exp):
        base = {r["step"]: r for r in sel["steps"]}
        order: list[tuple[str, Run, int]] = [("unpruned (step 0)", sel, 0)]
        final = max(base)
        order.append((f"selective, step {final}", sel, final))
        if rand:
            order.append(
                (
                    f"random, step {max(r['step'] for r in rand['steps'])}",
                    rand,
                    max(r["step"] for r in rand["steps"]),
                )
            )
        for name, run, step in order:
            report = next((r for r in run["steps"] if r["step"] == step), None)
            if report is None:
                continue
            tox = report.get("extra", {}).get("toxicity")
            ret = report["metrics"]["retain"]
            fg = report["metrics"]["forget"]
            rows.append(
                [
                    name,
                    frac_label(run, report) or "0",
                    pct_ci(tox["toxic_rate"], tox["ci"].get("toxic_rate")) if tox else "not measured",
                    num_ci(tox["mean_score"], tox["ci"].get("mean_score"), 3) if tox else "–",
                    num_ci(ret["perplexity"], ret["ci"].get("perplexity")),
                    num_ci(fg["perplexity"], fg["ci"].get("perplexity")),
                ]
            )
    return rows


def toxicity_facts(exp: Mapping[str, Any]) -> dict[str, Any]:
    """Before/after toxic rate and retain perplexity, for the summary sentence."""
    for sel, rand in pairs(exp):
        steps = {r["step"]: r for r in sel["steps"]}
        final = max(steps)
        before = steps.get(0, {}).get("extra", {}).get("toxicity")
        after = steps[final].get("extra", {}).get("toxicity")
        rfinal = max((r["step"] for r in rand["steps"]), default=0) if rand else 0
        rand_after = (
            next((r for r in rand["steps"] if r["step"] == rfinal), {}).get("extra", {}).get("toxicity")
            if rand
            else None
        )
        return {
            "before": before,
            "after": after,
            "random_after": rand_after,
            "ppl_before": steps[0]["metrics"]["retain"]["perplexity"] if 0 in steps else None,
            "ppl_after": steps[final]["metrics"]["retain"]["perplexity"],
            "ppl_after_ci": steps[final]["metrics"]["retain"]["ci"].get("perplexity"),
            "ppl_random": next((r for r in rand["steps"] if r["step"] == rfinal), {})
            .get("metrics", {})
            .get("retain", {})
            .get("perplexity")
            if rand
            else None,
            "final": final,
            "fraction": frac_label(sel, steps[final]),
        }
    return {}


def final_point(run: Run, at: int | None = None) -> DropPoint | None:
    ps = points(run)
    if not ps:
        return None
    return ps.get(at if at is not None else max(ps))
