"""Choose the digits ViT's shape and pruning recipe by how well one class can be unlearned, on
validation only.

bench/vit_digits.py showed that the first recipe (64 wide, 128 FF neurons per layer, pruned with the
paper's settings) cannot forget a class by 80% while the others lose at most 5 points: the paper's
ViT-base has 36,864 FF neurons, ours 512. Two levers are honest: a wider model (the paper reads larger
models as separating tasks better) and selprune's own default recipe (dev importance, mean ablation,
per-layer quota), chosen on *text* validation for keeping what should be kept. This sweep tries both,
as candidates (model, pruning recipe), and scores each one on the *validation* split alone:

- validation accuracy (a candidate's model must stay within 1 point of the most accurate one);
- for every class in turn as the forget class, the validation sweep of bench/vit_digits.py
  (`choose_on_validation`): whether some (fraction, step) meets both targets on validation, and the
  best forget drop found within the retain limit.

The winner has the most classes meeting both targets, then the highest mean forget drop within the
limit. No held-out image is scored here; bench/vit_digits.py measures the held-out split afterwards,
with what this sweep picked.

Usage: python bench/vit_recipes.py [--candidates base base/selprune ...] [--classes 0 1 ...]
                                   [--cache DIR] [--json PATH]
Each model is cached under <cache>/vit-recipes/<recipe key>/, with its validation figures per pruning
recipe, so candidates can be scored by parallel processes and picked among by a last run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.vit_digits import FORGET_TARGET, RETAIN_LIMIT, choose_on_validation  # noqa: E402
from selprune_core.images import load_digits_splits  # noqa: E402
from selprune_core.vision_model import (  # noqa: E402
    VitRecipe,
    ensure_digits_vit,
    load_digits_vit,
    recipe_key,
)

ROOT = Path(__file__).resolve().parent.parent
# Spelled out, not VitRecipe()'s defaults: the picked shape becomes the default.
BASE = replace(VitRecipe(), hidden_size=64, intermediate_size=128)
MODELS: dict[str, VitRecipe] = {
    "base": BASE,  # 64 wide, 128 FF neurons per layer: the first recipe
    "ff512": replace(BASE, intermediate_size=512),  # 4x the FF neurons, same residual width
    "w128": replace(BASE, hidden_size=128, intermediate_size=512),  # the ViT 4:1 FF ratio at width 128
    "w128-ff1024": replace(BASE, hidden_size=128, intermediate_size=1024),
}
# A candidate is a model and a pruning recipe (protocol.RECIPES): "base" is the paper's recipe on the
# base model, "base/selprune" selprune's default recipe (chosen on text) on it. The selprune recipe
# was scored on the two narrow models, first; on both it met the targets for fewer classes than the
# paper's, so for time it was not run on the wide two.
CANDIDATES: dict[str, tuple[VitRecipe, str]] = {
    **{name: (model, "paper") for name, model in MODELS.items()},
    **{f"{name}/selprune": (MODELS[name], "selprune") for name in ("base", "ff512")},
}
ACCURACY_SLACK = 0.01  # a candidate may trail the most accurate one by at most this much on validation


def class_sweep(curves: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether any validation step met both targets, and the best forget drop within the retain limit."""
    points = [p for run in curves for p in run["curve"]]
    within = [p["forget_drop"] for p in points if p["retain_points_lost"] <= RETAIN_LIMIT]
    return {
        "qualifies": any(
            p["forget_drop"] >= FORGET_TARGET and p["retain_points_lost"] <= RETAIN_LIMIT for p in points
        ),
        "best_forget_drop_within_limit": max(within, default=0.0),
    }


def score(name: str, recipe: VitRecipe, pruning: str, args: argparse.Namespace) -> dict[str, Any]:
    """A candidate's validation figures; cached next to its model, keyed by the sweep's settings, so
    candidates can be scored by parallel processes and then picked among in one run."""
    home = args.cache / "vit-recipes" / recipe_key(recipe)
    settings = {"classes": args.classes, "fracs": args.fracs, "max_steps": args.max_steps}
    saved = home / f"validation_sweep_{pruning}.json"
    cached = json.loads(saved.read_text()) if saved.is_file() else None
    if cached is not None and cached["settings"] == settings:
        return {**cached["result"], "pruning_recipe": pruning}
    folder = ensure_digits_vit(home, recipe)
    classifier, info = load_digits_vit(folder)
    splits = load_digits_splits(recipe.split)
    per_class = {}
    for c in args.classes:
        sweep_args = argparse.Namespace(
            forget_class=c,
            fracs=args.fracs,
            max_steps=args.max_steps,
            components="ff+attn",
            eps=1e-5,
            recipe=pruning,
        )
        frac, steps, curves = choose_on_validation(classifier, splits, sweep_args)
        per_class[c] = {**class_sweep(curves), "chosen_frac": frac, "chosen_steps": steps}
        print(f"  {name} class {c}: {per_class[c]}", flush=True)
    drops = [v["best_forget_drop_within_limit"] for v in per_class.values()]
    result = {
        "recipe": asdict(recipe),
        "key": recipe_key(recipe),
        "pruning_recipe": pruning,
        "validation_accuracy": info["accuracy"]["validation"],
        "train_seconds": info["train_seconds"],
        "classes_qualifying": sum(v["qualifies"] for v in per_class.values()),
        "mean_best_forget_drop": sum(drops) / len(drops),
        "per_class": per_class,
    }
    saved.write_text(json.dumps({"settings": settings, "result": result}, indent=2))
    return result


def pick(results: dict[str, dict[str, Any]]) -> str:
    """The rule in the module docstring."""
    best_accuracy = max(r["validation_accuracy"] for r in results.values())
    eligible = {
        n: r for n, r in results.items() if r["validation_accuracy"] >= best_accuracy - ACCURACY_SLACK
    }
    return max(
        eligible, key=lambda n: (eligible[n]["classes_qualifying"], eligible[n]["mean_best_forget_drop"])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", choices=sorted(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--fracs", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.05])
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = {}
    for name in args.candidates:
        results[name] = score(name, *CANDIDATES[name], args)
        r = results[name]
        print(
            f"{name}: validation accuracy {100 * r['validation_accuracy']:.1f}%, "
            f"{r['classes_qualifying']}/{len(args.classes)} classes meet both targets on validation, "
            f"mean best forget drop within the limit {100 * r['mean_best_forget_drop']:.1f}%",
            flush=True,
        )
    winner = pick(results)
    print(f"picked on validation: {winner}")
    if args.json:
        figures = {
            "command": " ".join(["python", *sys.argv]),
            "forget_target": FORGET_TARGET,
            "retain_limit": RETAIN_LIMIT,
            "accuracy_slack": ACCURACY_SLACK,
            "candidates": results,
            "picked": winner,
            "seconds": time.perf_counter() - started,
        }
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
