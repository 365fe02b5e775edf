"""The section of docs/results.md on 'Is it really gone?': selective pruning against gradient ascent,
gradient difference and task arithmetic at matched retain cost, with the relearning attack and
membership inference, from the JSON bench/baselines.py and bench/relearn.py write (docs/results/
baselines_<task>.json, relearn_<task>.json). Nothing here loads a model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.fidelity_tables import num_ci, pct, pct_ci, table

TASKS = {
    "code": "forget Python code, keep English prose",
    "toxicity": "forget the model's toxic continuations, keep its clean ones",
}
METHODS = {
    "unpruned": "unpruned model",
    "selective_pruning": "selective pruning (mask)",
    "gradient_ascent": "gradient ascent",
    "gradient_difference": "gradient difference",
    "task_arithmetic": "task arithmetic",
}
Row = Mapping[str, Any]


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _top1(row: Row, side: str) -> str:
    ev = row["eval"][side]
    return pct_ci(ev["top1"], ev.get("top1_ci"))


def _where(row: Row) -> str:
    if "steps" in row:
        return f"{row['steps']} steps"
    if "alpha" in row:
        return f"alpha {row['alpha']:g}"
    return "–"


def _tox(row: Row) -> str:
    tox = row.get("toxicity")
    if not tox:
        return "–"
    return pct_ci(tox["toxic_rate"], (tox.get("wilson") or {}).get("toxic_rate"))


def _wilson(row: Row) -> Any:
    return ((row.get("toxicity") or {}).get("wilson") or {}).get("toxic_rate")


def _overlap(a: Any, b: Any) -> bool:
    """Whether two [lo, hi] intervals overlap; True when either is missing (nothing is resolved then)."""
    if not a or not b:
        return True
    return bool(a[0] <= b[1] and b[0] <= a[1])


def _seconds(key: str, row: Row) -> str:
    s = row.get("seconds")
    return "–" if s is None or key == "unpruned" else f"{s / 60:.1f} min"


def method_rows(exp: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for key, row in exp["rows"].items():
        matched = row.get("matched")
        rows.append(
            [
                METHODS.get(key, key),
                _where(row),
                f"{_top1(row, 'forget')} ({pct(row['forget_drop'])})",
                f"{_top1(row, 'retain')} ({pct(row['retain_drop'])})",
                "reference" if matched is None else ("yes" if matched else "**no**"),
                _tox(row),
                pct_ci(row["relearned_forget_top1"], row.get("relearned_forget_top1_ci")),
                num_ci(row["membership"]["auc"], row["membership"]["ci"], 3),
                _seconds(key, row),
            ]
        )
    return rows


def verdicts(exp: Mapping[str, Any]) -> list[str]:
    """What held and what did not, read off one task's rows."""
    rows = exp["rows"]
    sel, base = rows["selective_pruning"], rows["unpruned"]
    others = {k: r for k, r in rows.items() if k not in ("unpruned", "selective_pruning")}
    out = []
    matched = {k: r for k, r in others.items() if r.get("matched")}
    unmatched = sorted(set(others) - set(matched))
    if unmatched:
        out.append(
            f"Not matched (every checkpoint cost more retain accuracy than the mask's "
            f"{pct(exp['retain_cost'])}): {', '.join(METHODS[k] for k in unmatched)}; their row shows the "
            "cheapest checkpoint."
        )
    short = {
        k: max(c["retain_drop"] for c in r["checkpoints"])
        for k, r in matched.items()
        if r.get("checkpoints") and max(c["retain_drop"] for c in r["checkpoints"]) < exp["retain_cost"] / 2
    }
    if short:
        out.append(
            "Under-spent: "
            + ", ".join(f"{METHODS[k]} (largest retain drop {pct(v)})" for k, v in short.items())
            + f" never came near the mask's retain cost ({pct(exp['retain_cost'])}) within its budget, so it is "
            "compared at a lower retain cost than the mask; more steps or a larger rate would buy it more forgetting."
        )
    best = max(matched.items(), key=lambda kv: kv[1]["forget_drop"], default=None)
    if best is not None:
        name, row = best
        verb = "beats" if sel["forget_drop"] > row["forget_drop"] else "does not beat"
        separated = not _overlap(sel["eval"]["forget"].get("top1_ci"), row["eval"]["forget"].get("top1_ci"))
        out.append(
            f"At matched retain cost, selective pruning ({pct(sel['forget_drop'])} forget drop) {verb} the best "
            f"matched baseline, {METHODS[name]} ({pct(row['forget_drop'])})"
            + (
                "; their forget top-1 intervals do not overlap."
                if separated
                else " on the point estimates; their forget top-1 intervals overlap, so this run does not "
                "separate the two."
            )
        )
    lost = base["eval"]["forget"]["top1"] - sel["eval"]["forget"]["top1"]
    if lost > 0:
        back = (sel["relearned_forget_top1"] - sel["eval"]["forget"]["top1"]) / lost
        brings = f"brings back {pct(back)}" if back > 0 else "brings back none"
        out.append(
            f"Relearning: fine-tuning through the mask on {exp['settings']['relearn_n']} forget texts "
            f"({exp['settings']['relearn_steps']} steps) {brings} of the forget accuracy the mask "
            f"removed ({pct(sel['eval']['forget']['top1'])} → {pct(sel['relearned_forget_top1'])}); the same "
            f"budget takes the unpruned model from {pct(base['eval']['forget']['top1'])} to "
            f"{pct(base['relearned_forget_top1'])}."
        )
    for key, row in [("selective_pruning", sel), *others.items()]:
        lo, hi = row["membership"]["ci"]
        if lo <= 0.5 <= hi:
            continue
        side = "above" if lo > 0.5 else "below"
        out.append(
            f"Membership: {METHODS[key]}'s AUC {row['membership']['auc']:.3f} [{lo:.3f}, {hi:.3f}] lies {side} "
            "0.5: its members are distinguishable from held-out texts."
        )
    lo, hi = base["membership"]["ci"]
    out.append(
        f"Membership before unlearning: AUC {base['membership']['auc']:.3f} [{lo:.3f}, {hi:.3f}]"
        + (
            ": the attack cannot tell the forget-train texts from held-out ones even on the unpruned model, so "
            "on this data it cannot show forgetting either way."
            if lo <= 0.5 <= hi
            else "."
        )
    )
    if sel.get("toxicity") and base.get("toxicity"):
        out.append(
            f"Toxic continuations: {pct(base['toxicity']['toxic_rate'])} unpruned, "
            f"{pct(sel['toxicity']['toxic_rate'])} through the mask; "
            + ", ".join(
                f"{METHODS[k]} {pct(r['toxicity']['toxic_rate'])}"
                for k, r in others.items()
                if r.get("toxicity")
            )
            + "."
            + (
                " The mask's Wilson interval overlaps the unpruned model's, so this many prompts does not resolve "
                "its change."
                if _overlap(_wilson(sel), _wilson(base))
                else ""
            )
        )
    return [f"- {line}" for line in out]


def relearn_rows(exp: Mapping[str, Any]) -> list[list[str]]:
    before = exp["before"]
    rows = []
    for run in exp["runs"]:
        start = run["start"]
        rows.append(
            [
                str(run["n"]),
                "unpruned model" if start == "base" else "through the mask",
                pct_ci(before[start]["forget"]["top1"], before[start]["forget"].get("top1_ci")),
                pct_ci(run["after"]["forget"]["top1"], run["after"]["forget"].get("top1_ci")),
                pct(run["after"]["retain"]["top1"]),
                pct(exp["recovered"].get(str(run["n"]))) if start == "mask" else "–",
            ]
        )
    return rows


def relearn_caveat(exp: Mapping[str, Any]) -> str | None:
    """A warning when the fine-tuning lowers even the unpruned model's forget accuracy at every N: then
    the attack's budget does not teach the forget data at all, and "recovered" measures nothing."""
    base_before = exp["before"]["base"]["forget"]["top1"]
    base_after = [run["after"]["forget"]["top1"] for run in exp["runs"] if run["start"] == "base"]
    if not base_after or max(base_after) >= base_before:
        return None
    return (
        f"The same fine-tuning lowers the unpruned model's forget top-1 at every N ({pct(base_before)} → "
        f"{', '.join(pct(a) for a in base_after)}): at this budget it does not teach the forget data, so "
        "the *recovered* column cannot show relearning on this task, only noise around the mask's level."
    )


def plot(out: Path, exps: Mapping[str, Mapping[str, Any]]) -> str:
    """results/baselines.png: forget drop against retain drop per method, one panel per task."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(exps), 4.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (task, exp) in enumerate(exps.items()):
        ax = fig.add_subplot(1, len(exps), i + 1)
        for j, (key, row) in enumerate(exp["rows"].items()):
            if key == "unpruned":
                continue
            marker = "*" if key == "selective_pruning" else "o"
            ax.scatter(row["retain_drop"], row["forget_drop"], s=120 if marker == "*" else 50, marker=marker,
                       color=f"C{j}", label=METHODS.get(key, key))  # fmt: skip
            for cp in row.get("checkpoints", []):
                ax.scatter(cp["retain_drop"], cp["forget_drop"], s=12, color=f"C{j}", alpha=0.4)
        ax.axvline(exp["retain_cost"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("retain top-1 drop")
        ax.set_ylabel("forget top-1 drop")
        ax.set_title(TASKS.get(task, task), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    (out / "results" / "baselines.png").write_bytes(_png(fig))
    return "![forget drop against retain drop per method](results/baselines.png)"


def _png(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _budget(exp: Mapping[str, Any]) -> str:
    s = exp["settings"]
    tox = (
        f", toxicity on {s['tox_prompts']} held-out toxic prompts (one 32-token sample each)"
        if exp.get("task") == "toxicity"
        else ""
    )
    return (
        f"Budget (2-core CPU, fp32): gradient methods {s['steps']} AdamW steps of {s['batch_size']} texts x "
        f"{s['token_limit']} tokens at lr {s['lr']:g}, a checkpoint every {s['eval_every']} steps; task arithmetic "
        f"the same fine-tuning, alphas {', '.join(f'{a:g}' for a in s['alphas'])}; relearning {s['relearn_steps']} "
        f"steps on {s['relearn_n']} forget-train texts; evaluation {s['eval_tokens']} predictions per set; "
        f"membership {s['mia_texts']} members against every held-out forget text{tox}."
    )


def _command(exp: Mapping[str, Any], script: str) -> str:
    return str(exp.get("command") or f"python {script} --task {exp.get('task', 'code')}")


def attacks_section(out: Path) -> list[str]:
    results = out / "results"
    exps = {t: e for t in TASKS if (e := _load(results, f"baselines_{t}")) is not None}
    relearn = {t: e for t in TASKS if (e := _load(results, f"relearn_{t}")) is not None}
    lines = ["## Is it really gone? Other unlearning methods, relearning and membership inference", ""]
    if not exps and not relearn:
        return lines + ["Not run (no baselines_*.json or relearn_*.json in docs/results/).", ""]
    lines += [
        "Selective pruning against three gradient-based methods on the same data (bench-only: each changes every "
        "weight, so it is a whole model, not a mask the service can serve), compared at the checkpoint with the "
        "largest forget drop whose retain top-1 drop is at most the mask's (matched retain cost). Every compared "
        "model then gets the relearning attack (fine-tuning on a few forget-train texts; through the mask for "
        "selective pruning) and the loss attack's membership AUC (forget-train texts the job sampled against "
        "held-out forget texts). Top-1 is next-token accuracy on held-out texts with its 95% bootstrap interval, "
        "drops are relative to the unpruned model, toxic rates carry Wilson intervals, AUCs bootstrap "
        "intervals. Wall time: the mask is its whole `selprune prune` job (statistics, scoring, the per-step "
        "evaluations of its budget); a gradient method is its training up to the compared checkpoint; task "
        "arithmetic its fine-tuning run. Wall times come from one run on the 2-core machine and move with "
        "whatever else runs there (the JSON records the load average at the end of the run, where known).",
        "",
    ]
    if exps:
        lines.append(plot(out, exps))
        lines.append("")
    for task, exp in exps.items():
        lines += [f"### {TASKS[task]}", ""]
        lines += table(
            ["method", "compared at", "forget top-1 (drop)", "retain top-1 (drop)", "matched", "toxic rate",
             "forget top-1 after relearning", "membership AUC", "wall time"],
            method_rows(exp),
        )  # fmt: skip
        lines += verdicts(exp)
        lines += [
            "",
            _budget(exp),
            "",
            f"Command: `{_command(exp, 'bench/baselines.py')}` ({exp['seconds'] / 60:.0f} min).",
            "",
        ]
    for task, exp in relearn.items():
        s = exp["settings"]
        lines += [f"### Relearning by the number of forget texts ({TASKS[task]})", ""]
        lines += table(
            [
                "N texts",
                "start",
                "forget top-1 before",
                "after relearning",
                "retain top-1 after",
                "recovered",
            ],
            relearn_rows(exp),
        )
        lines += [
            f"{s['steps']} AdamW steps of {s['batch_size']} texts x {s['token_limit']} tokens at lr {s['lr']:g}; "
            "*recovered* is the share of the mask's forget-accuracy loss that came back. "
            f"Command: `{_command(exp, 'bench/relearn.py')}` ({exp['seconds'] / 60:.0f} min).",
            "",
        ]
        if note := relearn_caveat(exp):
            lines += [note, ""]
    return lines
