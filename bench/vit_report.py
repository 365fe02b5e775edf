"""The section of docs/results.md on the paper's ViT experiment, on the digits ViT: forget one class,
keep the rest, against matched random pruning, from docs/results/vit_digits.json (bench/vit_digits.py)
alone."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.fidelity_tables import pct, pct_ci, table
from protocol import RECIPES

TITLE = "## The paper's ViT experiment on the digits ViT: forget one class (held-out images)"
TARGETS = {
    "forget_drop_ge_80pct": "forget-class accuracy down by at least 80% relative",
    "retain_loss_le_5pts": "the other classes lose at most 5 points",
    "beats_random_every_step_point": "selective separation above matched random at every step (point estimate)",
    "beats_random_every_step_ci": "... with the 95% interval of the difference above 0 at every step",
}


def _qualified(exp: Mapping[str, Any]) -> bool:
    """Whether some validation step met both targets (else the bench fell back to the best separation)."""
    s = exp["settings"]
    target, limit = s.get("forget_target", 0.8), s.get("retain_limit", 0.05)
    return any(
        p["forget_drop"] >= target and p["retain_points_lost"] <= limit
        for run in exp.get("validation_sweep", [])
        for p in run["curve"]
    )


# Column headers of the per-class table.
SHORT = {
    "forget_drop_ge_80pct": "forget drop >= 80%",
    "retain_loss_le_5pts": "others lose <= 5 points",
    "beats_random_every_step_point": "beats random at every step",
    "beats_random_every_step_ci": "beats random at every step (95% CI)",
}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _recipe_words(name: str) -> str:
    """How the report names a pruning recipe (protocol.RECIPES)."""
    r = RECIPES[name]
    offset = "zero ablation" if r["offset_mode"] == "zero" else "mean ablation"
    return f"{name} recipe (`{r['ff_scoring']}` importance, {offset}, {r['selection']} selection)"


def step_rows(exp: Mapping[str, Any]) -> list[list[str]]:
    comparison = {row["step"]: row for row in exp["comparison"]}
    rows = []
    for report in exp["selective"]:
        m, step = report["metrics"], report["step"]
        randoms = [run[step]["metrics"] for run in exp["random"] if len(run) > step]
        row = comparison.get(step)
        diff = (
            f"{row['difference']:+.3f} [{row['difference_ci'][0]:+.3f}, {row['difference_ci'][1]:+.3f}]"
            if row
            else "–"
        )
        rows.append(
            [
                str(step),
                str(report["ff_pruned"] + report["attn_pruned"]),
                pct_ci(m["forget"]["top1"], m["forget"]["ci"].get("top1")),
                pct_ci(m["retain"]["top1"], m["retain"]["ci"].get("top1")),
                pct(_mean([r["forget"]["top1"] for r in randoms])),
                pct(_mean([r["retain"]["top1"] for r in randoms])),
                diff,
            ]
        )
    return rows


def vit_section(out: Path) -> list[str]:
    path = out / "results" / "vit_digits.json"
    if not path.is_file():
        return [TITLE, "", "Not run (no vit_digits.json in docs/results/).", ""]
    exp = json.loads(path.read_text())
    sweep = _recipe_sweep(out)
    s, model, final = exp["settings"], exp["model"], exp["final"]
    acc = model["accuracy"]
    lines = [
        TITLE,
        "",
        f"The model is the digits ViT (`selprune_core/vision_model.py`: {model['recipe']['num_hidden_layers']} layers, "
        f"width {model['recipe']['hidden_size']}, {model['recipe']['intermediate_size']} FF neurons per layer, "
        "trained once offline on scikit-learn's 8x8 digits, deterministic "
        f"and cached): held-out accuracy {pct(acc['heldout'])} (validation {pct(acc['validation'])}, train "
        f"{pct(acc['train'])}). Forget class {s['forget_class']} (fixed before any result), retain the other nine. "
        f"Selective pruning with the {_recipe_words(s.get('recipe', 'paper'))} on FF and attention pre-out "
        f"neurons, eps {s['eps']:g}, "
        f"{pct(s['chosen_ff_frac'], 0)} of each per step for {s['chosen_steps']} steps (chosen on the validation "
        f"split among {', '.join(f'{f:g}' for f in s['fracs'])}); the random baseline prunes the same per-layer "
        f"counts at {s['random_seeds']} seeds. *Separation* is forget drop minus retain drop (relative top-1); the "
        "last column is selective minus the random seeds' mean, with a paired bootstrap interval over held-out images.",
        "",
        *_shape_lines(sweep, model),
    ]
    lines += table(
        ["step", "neurons pruned", "selective forget", "selective retain", "random forget (mean)",
         "random retain (mean)", "separation: selective - random"],
        step_rows(exp),
    )  # fmt: skip
    lines += [
        f"Final: forget accuracy down {pct(final['forget_drop'])} relative, the other classes "
        f"{100 * final['retain_points_lost']:.2f} points down. The paper (ViT-base on ImageNet, forgetting "
        "'mushroom'): forget 72% → 0%, the rest 90.0% → 89.5%.",
        "",
        "What held and what did not:",
        "",
        *[
            f"- {TARGETS.get(name, name)}: **{'met' if met else 'missed'}**"
            for name, met in exp["targets"].items()
        ],
        "",
        "The forget class has 53 held-out images, so its intervals are about ±10 points. Disclosure: before this "
        "run, a first one with the language-model setting (FF only, eps 1e-3) had printed its held-out figures "
        "(34% forget drop); the switch to the paper's ViT settings was then chosen on validation, but not blind "
        "to that number.",
        "",
        f"Command: `{exp['command']}` ({exp['seconds'] / 60:.1f} min on 2 CPU cores, the model already cached).",
        "",
    ]
    return lines + class_lines(out, exp) + choice_lines(out, sweep)


def _recipe_sweep(out: Path) -> dict[str, Any] | None:
    """docs/results/vit_recipes.json (bench/vit_recipes.py), when it was run."""
    path = out / "results" / "vit_recipes.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _shape_lines(sweep: Mapping[str, Any] | None, model: Mapping[str, Any]) -> list[str]:
    """When the model is the shape bench/vit_recipes.py picked: that, and what the service ships."""
    if sweep is None:
        return []
    picked, base = sweep["candidates"][sweep["picked"]], sweep["candidates"].get("base")
    if picked["key"] != model.get("key") or base is None or base["key"] == picked["key"]:
        return []
    return [
        "This shape is the one `bench/vit_recipes.py` picked on validation (below). The service's built-in "
        f"`builtin:vit-digits` keeps the first shape (width {base['recipe']['hidden_size']}), which trained in "
        f"{base['train_seconds']:.0f} s against {picked['train_seconds']:.0f} s here and met both targets on "
        f"validation for {base['classes_qualifying']} classes against {picked['classes_qualifying']}.",
        "",
    ]


def choice_lines(out: Path, sweep: Mapping[str, Any] | None) -> list[str]:
    """How the model and pruning recipe were chosen, from docs/results/vit_recipes.json
    (bench/vit_recipes.py): every candidate's validation figures, and which one was picked; with the
    first model's runs (in `out`) that prompted the choice."""
    if sweep is None:
        return []
    rows = [
        [
            name + (" (picked)" if name == sweep["picked"] else ""),
            str(c["recipe"]["hidden_size"]),
            str(c["recipe"]["num_hidden_layers"] * c["recipe"]["intermediate_size"]),
            c["pruning_recipe"],
            pct(c["validation_accuracy"]),
            f"{c['classes_qualifying']} of {len(c['per_class'])}",
            pct(c["mean_best_forget_drop"]),
        ]
        for name, c in sweep["candidates"].items()
    ]
    lines = [
        "### How the model and recipe were chosen (validation only)",
        "",
        "`bench/vit_recipes.py` trained each candidate model and ran the validation sweep above for every "
        "class as the forget class. A candidate's model must be within "
        f"{100 * sweep['accuracy_slack']:.0f} point of the best validation accuracy; among those, the most "
        "classes meeting both targets on validation wins, then the highest mean forget drop found within the "
        "retain limit. No held-out image is read.",
        "",
    ]
    lines += table(
        ["candidate", "width", "FF neurons", "pruning recipe", "validation accuracy",
         "classes meeting both targets (validation)", "mean best forget drop within the limit"],
        rows,
    )  # fmt: skip
    first = out / "results" / "vit_digits_first_model.json"
    if first.is_file():  # the runs on the first model that prompted the sweep
        exp = json.loads(first.read_text())
        r, final = exp["model"]["recipe"], exp["final"]
        runs = [exp] + [
            json.loads(p.read_text()) for p in sorted(out.glob("results/vit_digits_first_model_class*.json"))
        ]
        met = "; ".join(
            f"{SHORT.get(name, name)}: {sum(bool(e['targets'].get(name)) for e in runs)} of {len(runs)}"
            for name in exp["targets"]
        )
        lines += [
            f"Disclosure: this sweep was run after the first model (width {r['hidden_size']}, "
            f"{r['num_hidden_layers'] * r['intermediate_size']} FF neurons, paper recipe) had been measured on "
            f"held-out images: forget class {exp['settings']['forget_class']} down "
            f"{pct(final['forget_drop'])}, the other classes {100 * final['retain_points_lost']:.2f} points down; "
            f"over the {len(runs)} forget classes run, {met} (docs/results/vit_digits_first_model*.json). The "
            "sweep reads validation images only, but the decision to look for another model was not blind to "
            "those results.",
            "",
        ]
    lines += [
        f"Command: `{sweep['command']}`. Each candidate's figures are cached next to its model, so candidates "
        "can be scored by parallel runs (`--candidates`) and picked among by a last one.",
        "",
    ]
    return lines


def class_lines(out: Path, first: dict[str, Any]) -> list[str]:
    """Every forget class the bench was run on (vit_digits.json and vit_digits_class<N>.json), one row
    each, with how many classes met each target: one class's result says little on 53 images."""
    exps = [first] + [
        json.loads(path.read_text())
        for path in sorted(out.glob("results/vit_digits_class*.json"))
        if json.loads(path.read_text())["settings"]["forget_class"] != first["settings"]["forget_class"]
    ]
    if len(exps) < 2:
        return []
    exps.sort(key=lambda e: e["settings"]["forget_class"])
    names = list(first["targets"])
    rows = [
        [
            str(e["settings"]["forget_class"]),
            f"{pct(e['settings']['chosen_ff_frac'], 0)} x {e['settings']['chosen_steps']}",
            str(e["settings"]["random_seeds"]),
            "yes" if _qualified(e) else "no",
            pct(e["final"]["forget_drop"]),
            f"{100 * e['final']['retain_points_lost']:.2f}",
            *("met" if e["targets"].get(name) else "missed" for name in names),
        ]
        for e in exps
    ]
    met = {name: sum(bool(e["targets"].get(name)) for e in exps) for name in names}
    lines = [
        "### Every forget class",
        "",
        "The same bench run once per forget class, each with its fraction and steps chosen on validation (the "
        "rule above), on the same model; the classes after the first with fewer random seeds.",
        "",
    ]
    lines += table(
        ["forget class", "chosen (per step x steps)", "random seeds", "targets reached on validation", "forget drop", "other classes: points lost",
         *(SHORT.get(name, name) for name in names)],
        rows,
    )  # fmt: skip
    lines += [
        "Classes meeting each target: "
        + "; ".join(f"{SHORT.get(n, n)}: {met[n]} of {len(exps)}" for n in names)
        + ".",
        "",
        f"On validation, {sum(map(_qualified, exps))} of {len(exps)} classes reached both targets at some step; "
        "for the others the rule fell back to the best separation within the retain limit, so their held-out "
        "forget drop was never going to reach the target. Validation has about 19 images per class, so a "
        "setting that qualifies there can still fall short on the 53 held-out ones.",
        "",
        "Commands: " + "; ".join(f"`{e['command']}` ({e['seconds'] / 60:.1f} min)" for e in exps) + ".",
        "",
    ]
    return lines
