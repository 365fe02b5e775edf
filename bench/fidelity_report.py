"""docs/results.md and its plots, generated from docs/results/<experiment>.json alone (no model needed).

Every number in the markdown comes from the JSON written by bench/fidelity.py; the verdict sentences
are computed here too, so rerunning the experiments rewrites the conclusions with the numbers.
This module assembles the document; its sections come from bench/recipes_report.py and
bench/detox_report.py (keeping the model) and bench/paper_report.py (the paper's findings).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.attacks_report import attacks_section
from bench.detox_report import detox_rows, detox_verdicts, section_detox
from bench.fidelity_tables import table
from bench.mlm_report import mlm_section
from bench.paper_report import NOTES, ORDER, TITLES, findings, section_pairs, toxicity_section
from bench.recipes_report import (
    budget_bullets,
    section_budget,
    section_heldout,
    section_heldout_targets,
    section_validation,
)
from bench.vit_report import vit_section


def budget_lines(exps: Mapping[str, Mapping[str, Any]]) -> list[str]:
    any_exp = next(iter(exps.values()))
    b = any_exp["budget"]
    rows = [
        ["per-text truncation (collection and evaluation)", f"{b['token_limit']} tokens", "1000"],
        ["statistics per dataset per step", f"> {b['collect_tokens']} tokens", "> 100,000"],
        ["evaluation per set per step", f"> {b['eval_tokens']} non-common-token predictions", "> 100,000"],
        ["bootstrap resamples (95% percentile intervals)", str(b["bootstrap"]), "none (no CIs)"],
        ["batch size", str(b["batch_size"]), "1"],
        [
            "toxicity prompts",
            f"{b['tox_prompts'] or 'all held-out'} toxic_prompts x {b['tox_samples']} sample(s)",
            "1 prompt x 1000",
        ],
        [
            "toxicity sampling",
            f"{b['tox_new_tokens']} new tokens, T=1.0, top-k 50, top-p 1.0, seed 0",
            "200 tokens, T=1.0",
        ],
        [
            "toxicity scorer",
            f"alt-profanity-check (`profanity`), score > {b['tox_threshold']}",
            "Detoxify original > 0.8",
        ],
        [
            "model / dtype / device",
            f"{any_exp['model']} / {any_exp['dtype']} / {any_exp['device']}",
            "OPT, Pythia, ... / fp16 / GPU",
        ],
    ]
    return table(["budget", "here", "paper"], rows)


def commits(exps: Mapping[str, Mapping[str, Any]]) -> str:
    """The commits the experiments ran at, and whether the working tree had uncommitted changes."""
    seen = sorted({e.get("git_commit", "")[:12] for e in exps.values()} - {""})
    dirty = {e.get("git_dirty") for e in exps.values()}
    state = (
        "clean working tree"
        if dirty == {False}
        else "working tree with uncommitted changes"
        if True in dirty
        else "working-tree state not recorded; it held other agents' uncommitted edits"
    )
    return f"git commit {', '.join(f'`{c}`' for c in seen) or 'unknown'} ({state})"


def model_size(exp: Mapping[str, Any]) -> str:
    run = next(iter(exp["runs"].values()), None)
    if run is None:
        return "no run yet"
    name = "SmolLM2-135M-Instruct, " if exp["model"] == "smollm2-135m-instruct" else ""
    return f"{name}{run['totals']['ff']} FF and {run['totals']['attn']} attention pre-out neurons"


KEEP_ORDER = [
    "recipes_val",
    "recipes_val_combo",
    "recipes_val_taylor",
    "keep",
    "keep_budget",
    "detox",
    "detox_random_a",
    "detox_random_b",
]


def keep_sections(out: Path, results: Path) -> list[str]:
    """Issue 9's sections: choosing the defaults, the held-out comparison, the demo job, toxicity."""
    exps = {
        name: json.loads((results / f"{name}.json").read_text())
        for name in KEEP_ORDER
        if (results / f"{name}.json").is_file()
    }
    if not exps:
        return []
    if "detox" in exps:  # the toxicity baselines ran as experiments of their own: one table
        for name in ("detox_random_a", "detox_random_b"):
            if name in exps:
                exps["detox"] = {**exps["detox"], "runs": {**exps["detox"]["runs"], **exps.pop(name)["runs"]}}
    lines = ["## Keeping the model: targets", ""]
    if "keep" in exps:
        lines += section_heldout_targets(exps["keep"])
    if "keep_budget" in exps:
        lines += budget_bullets(exps["keep_budget"])
    if "detox" in exps:
        lines += detox_verdicts(detox_rows(exps["detox"])[1])
    lines += [""]
    commands = sorted({run["command"] for e in exps.values() for run in e["runs"].values()})
    lines += [
        "Commands (each writes its JSON under docs/results/, or under the `--out` folder, from which the "
        "validation runs' JSON was copied into docs/results/; model, dtype and budgets are those of 'How it "
        "was run' below; the sections after this block up to 'What held and what did not' are this issue's, "
        "the ones after it reproduce the paper with its own recipe, at earlier commits):",
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    if "recipes_val" in exps:
        extra = [exps[n] for n in ("recipes_val_combo", "recipes_val_taylor") if n in exps]
        lines += section_validation(out, exps["recipes_val"], extra)
        if any(not e.get("complete") for e in extra):
            notes = [e.get("note", "") for e in extra if not e.get("complete")]
            lines += [f"Incomplete runs: {' '.join(n for n in notes if n)}", ""]
    if "keep" in exps:
        lines += section_heldout(out, exps["keep"])
    if "keep_budget" in exps:
        lines += section_budget(exps["keep_budget"])
    if "detox" in exps:
        lines += section_detox(out, exps["detox"])
    return lines


def write_report(out: Path) -> Path:
    results = out / "results"
    exps = {
        name: json.loads((results / f"{name}.json").read_text())
        for name in ORDER
        if (results / f"{name}.json").is_file()
    }
    lines = ["# Does it unlearn? The paper's findings on the embedded model", ""]
    lines += [
        "Generated by `python bench/fidelity.py report` from the JSON in `docs/results/`; do not edit by hand. "
        "Every number below is read from those files.",
        "",
    ]
    lines += keep_sections(out, results)
    lines += attacks_section(out)
    lines += vit_section(out)
    lines += mlm_section(out)
    if not exps:
        lines += ["No results yet: run `python bench/fidelity.py all`.", ""]
    else:
        first = next(iter(exps.values()))
        lines += [
            "## What held and what did not",
            "",
            *findings(exps),
            "",
            "Definitions: *drop* is the relative top-1 next-token accuracy drop against the unpruned model, "
            "(acc_0 - acc_i) / acc_0, on held-out texts (paper Figure 2). *Separation* is forget drop minus "
            "retain drop at the same step; random pruning removes the same per-layer numbers of neurons, so "
            "selective and random are compared at the same fractions step by step. Drop intervals are the "
            "step's 95% bootstrap interval of top-1 accuracy over held-out texts, divided by the step-0 "
            "accuracy (step 0's own uncertainty is not propagated).",
            "",
            "## How it was run",
            "",
            f"Model `{first['model']}` ({model_size(first)}), dtype {first['dtype']}, {commits(exps)}, {first.get('cpu_count')} CPU cores "
            "shared with other jobs, torch threads from `--threads` (default 1). The commands that produced the runs below:",
            "",
            "```",
            *sorted({run["command"] for exp in exps.values() for run in exp["runs"].values()}),
            "python bench/fidelity.py report   # regenerates this file and the plots from the JSON",
            "```",
            "",
            "Budgets, fixed before any pruning run from timing alone (paper defaults for every method "
            "hyperparameter: `abs` importance, eps 1e-3 FF / 1e-4 attention, 2% per step, statistics re-collected "
            "every step; the number of steps and the token budgets were scaled down to fit about 30 minutes per "
            "experiment on 2 shared CPU cores; nothing was tuned on held-out numbers). Statistics use the train "
            "split of each corpus, every number is measured on the held-out split. Two additions were made "
            "after seeing held-out results, and neither changes a selective number: the random baselines of "
            "(a) and (b) were extended to twice the selective runs' steps, because the first run's selective "
            "retain drops went beyond what random pruning reached at the same fraction; and the statistics-"
            "budget check at the end was added as a robustness check. The token budgets were cut once, from "
            "timing alone (a first launch on the contended machine was too slow), before any drop was looked at.",
            "",
            "Budgets:",
            "",
            *budget_lines(exps),
        ]
    for name in ORDER:
        if name not in exps:
            lines += [f"## {TITLES[name]}", "", "Not run (no JSON in docs/results/).", ""]
        elif name == "toxicity":
            lines += toxicity_section(out, exps[name])
        else:
            lines += section_pairs(out, name, exps[name], NOTES.get(name, []))
    if exps:
        lines += ["## Wall time per experiment", ""]
        lines += table(
            ["experiment", "wall (sum of its runs)", "complete"],
            [
                [
                    n,
                    f"{sum(r.get('wall_s', 0) for r in e['runs'].values()) / 60:.1f} min",
                    "yes" if e.get("complete") else "no",
                ]
                for n, e in exps.items()
            ],
        )
        lines += [
            "Wall time is the sum over the experiment's runs (selective and random); runs shared between "
            "experiments (e.g. `code_ff_abs`) were computed once and are counted in each.",
            "",
        ]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path
