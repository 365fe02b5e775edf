"""The section of docs/results.md on the masked LM: forget code, keep prose, against matched random
pruning, from docs/results/mlm_code.json (bench/mlm_code.py) alone."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.fidelity_tables import pct, pct_ci, table

TITLE = "## A masked LM: forget code, keep prose (held-out masked-token top-1)"
TARGETS = {
    "selective_final_ci": "code-vs-prose forgetting is selective: final separation above 0 (95% interval)",
    "beats_random_final_ci": "... and more so than random: final difference above 0 (95% interval)",
    "beats_random_every_step_point": "selective separation above matched random at every step (point estimate)",
    "beats_random_every_step_ci": "... with the 95% interval of the difference above 0 at every step",
    "retain_drop_within_limit": "prose top-1 drop within the limit the settings were chosen under",
}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def step_rows(exp: Mapping[str, Any]) -> list[list[str]]:
    comparison = {row["step"]: row for row in exp["comparison"]}
    rows = []
    for report in exp["selective"]:
        m, step = report["metrics"], report["step"]
        randoms = [run[step]["metrics"] for run in exp["random"] if len(run) > step]
        row = comparison.get(step)
        sep = "–"
        diff = "–"
        if row:
            lo, hi = row["selective_separation_ci"]
            sep = f"{row['selective_separation']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            diff = (
                f"{row['difference']:+.3f} [{row['difference_ci'][0]:+.3f}, {row['difference_ci'][1]:+.3f}]"
            )
        rows.append(
            [
                str(step),
                str(report["ff_pruned"] + report["attn_pruned"]),
                pct_ci(m["forget"]["top1"], m["forget"]["ci"].get("top1")),
                pct_ci(m["retain"]["top1"], m["retain"]["ci"].get("top1")),
                pct(_mean([r["forget"]["top1"] for r in randoms])),
                pct(_mean([r["retain"]["top1"] for r in randoms])),
                sep,
                diff,
            ]
        )
    return rows


def _model_sentence(model: Mapping[str, Any]) -> str:
    r, acc = model["recipe"], model["accuracy"]
    code, prose = acc["python_code"], acc["english_prose"]
    return (
        f"The model is the code/prose MLM (`selprune_core/mlm_model.py`: a RoBERTa with {r['num_hidden_layers']} "
        f"layers, width {r['hidden_size']}, {r['intermediate_size']} FF neurons per layer, a {r['vocab_size']}-token "
        f"byte-level BPE, trained once offline for {r['steps']} steps in {model['train_seconds'] / 60:.1f} min on "
        "`python_code` and `english_prose` in equal shares, deterministic and cached). Held-out masked top-1: code "
        f"{pct_ci(code['heldout']['top1'], code['heldout']['top1_ci'])} (always predicting the most common train "
        f"token: {pct(code['heldout']['unigram_top1'])}), prose "
        f"{pct_ci(prose['heldout']['top1'], prose['heldout']['top1_ci'])} (unigram "
        f"{pct(prose['heldout']['unigram_top1'])})."
    )


def _change(drop: float) -> str:
    return f"down {pct(drop)}" if drop >= 0 else f"up {pct(-drop)} (it did not drop)"


def _caveats(exp: Mapping[str, Any]) -> list[str]:
    """Computed notes: a choice at the edge of the grid, partial forgetting, the prose set's size."""
    s, last = exp["settings"], exp["selective"][-1]["metrics"]
    unigram = exp["model"]["accuracy"]["python_code"]["heldout"]["unigram_top1"]
    notes = []
    if s["chosen_frac"] == max(s["fracs"]) and s["chosen_steps"] == s["max_steps"]:
        notes.append(
            "The chosen setting is the largest of the grid (most neurons, last step): on validation the separation "
            "was still growing there, so more pruning might separate more; it was not tried."
        )
    if last["forget"]["top1"] > unigram:
        notes.append(
            f"Forgetting is partial: code top-1 ends at {pct(last['forget']['top1'])}, still above always "
            f"predicting the most common token ({pct(unigram)})."
        )
    prose = last["retain"]
    if "n_tokens" in prose:
        notes.append(
            f"The prose set is small ({prose['n_tokens']} masked predictions in {prose['n_texts']} texts), so its "
            "intervals are wide and its drops are noisy."
        )
    return [" ".join(notes), ""] if notes else []


def mlm_section(out: Path) -> list[str]:
    path = out / "results" / "mlm_code.json"
    if not path.is_file():
        return [TITLE, "", "Not run (no mlm_code.json in docs/results/).", ""]
    exp = json.loads(path.read_text())
    s, final = exp["settings"], exp["final"]
    candidates = ", ".join(f"{c} {f:g}" for c in s["components"] for f in s["fracs"])
    lines = [
        TITLE,
        "",
        _model_sentence(exp["model"]),
        "",
        "Forget `python_code`, retain `english_prose`; statistics on the unmasked train texts, evaluation on the "
        "held-out texts with 15% of the non-special tokens masked (80% `<mask>`, 10% random, 10% kept; one seed, "
        "so every step and every random run is scored on the same positions). Selective pruning with `abs` "
        f"importance, {s['chosen_components']} at {pct(s['chosen_frac'], 0)} per step for {s['chosen_steps']} "
        f"steps, chosen on the validation texts among {candidates} (largest separation with the prose drop "
        f"at most {pct(s['retain_limit'], 0)}); the random baseline prunes the same per-layer counts at "
        f"{s['random_seeds']} seeds. *Separation* is code drop minus prose drop (relative top-1), with a paired "
        "bootstrap interval over held-out texts; the last column is selective minus the random seeds' mean.",
        "",
    ]
    lines += table(
        ["step", "neurons pruned", "selective code", "selective prose", "random code (mean)",
         "random prose (mean)", "selective separation", "selective - random"],
        step_rows(exp),
    )  # fmt: skip
    lines += [
        f"Final: code top-1 down {pct(final['forget_drop'])} relative, prose {_change(final['retain_drop'])}.",
        "",
        *_caveats(exp),
        "What held and what did not:",
        "",
        *[
            f"- {TARGETS.get(name, name)}: **{'met' if met else 'missed'}**"
            for name, met in exp["targets"].items()
        ],
        "",
        f"Command: `{exp['command']}` ({exp['seconds'] / 60:.1f} min on 2 CPU cores, the model already cached).",
        "",
    ]
    return lines
