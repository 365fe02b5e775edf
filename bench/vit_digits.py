"""Unlearn one digit from a small ViT by selective pruning, against a matched random baseline.

The model is the digits ViT of selprune_core.vision_model (trained once offline, cached), by default
the shape the service ships; `--hidden-size` / `--intermediate-size` run another shape, such as the one
bench/vit_recipes.py picks on validation, and `--recipe` another pruning recipe. Statistics
are collected on the train split: forget = the forget class, retain = every other class. Pruning
follows the paper's ViT settings (docs/method.md §3.5, §6.8): `abs` importance for FF *and* attention
pre-out neurons at the same fraction, eps 1e-5, here recalculated every step; `--recipe selprune`
swaps in selprune's default scoring, ablation and selection. (FF-only `abs` at eps
1e-3, the language-model setting, was tried first: on validation it never reached the forget target
within the retain limit, 32% forget drop at most; `--components ff --eps 1e-3` runs it again. In
full disclosure: that first run had also printed its held-out figures, 34% forget drop, before the
switch, so the switch was not made blind to held-out numbers.)

The per-step fraction and the number of steps are chosen on the *validation* split only: for each
candidate fraction a run is evaluated on validation forget / retain images, and a (fraction, steps)
qualifies at the first step where the forget class has dropped >= 80% relative with the other classes
at most 5 points down; among qualifying candidates the one with the smallest retain loss wins (then
the smaller fraction). The held-out split is then measured with those settings, once.

The random baseline prunes, at every step, exactly the selective run's per-layer counts of new
neurons (at several seeds). "Selective beats random" compares separations, forget drop minus retain
drop (relative top-1 drops, as in the paper's curves), with a 95% interval from a paired bootstrap:
held-out images are resampled (forget and retain images separately), and the same resample scores
the base model, the selective mask and every random mask, so the interval reflects which images were
held out, and the random side is the mean over seeds.

Usage: python bench/vit_digits.py [--forget-class 0] [--fracs 0.01 0.02 0.03 0.05] [--max-steps 20]
                                  [--components ff+attn] [--eps 1e-5] [--random-seeds 5]
                                  [--recipe paper|selprune] [--hidden-size 64] [--intermediate-size 128]
                                  [--cache DIR] [--json PATH]

The forget class defaults to 0, the first label, fixed before any result was seen.
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

from protocol import RECIPES
from selprune_core.config import CollectConfig, EvalConfig, PruneConfig
from selprune_core.evaluation import TOP1
from selprune_core.image_measure import ImageClassifier, ImageMeasure, image_rows
from selprune_core.images import ImageSet, ImageSplits, load_digits_splits
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.pruning import PruneCallbacks, PruneOptions, PruneRun
from selprune_core.reports import StepReport
from selprune_core.vision_model import VitRecipe, ensure_digits_vit, load_digits_vit

ROOT = Path(__file__).resolve().parent.parent
FORGET_TARGET = 0.8  # relative drop of forget-class accuracy
RETAIN_LIMIT = 0.05  # accuracy points the other classes may lose
EVAL = EvalConfig(topk=3, batch_size=256, bootstrap_samples=1000)


def _sets(splits: ImageSplits, split: str, forget_class: int) -> dict[str, ImageSet]:
    images = splits.split(split)
    return {"forget": images.with_labels([forget_class]), "retain": images.without_labels([forget_class])}


def _config(
    args: argparse.Namespace, frac: float, steps: int, random_baseline: bool = False, seed: int = 0
) -> PruneConfig:
    recipe = RECIPES[getattr(args, "recipe", "paper")]
    return PruneConfig(
        ff_frac=frac,
        attn_frac=frac if args.components == "ff+attn" else 0.0,
        ff_scoring=recipe["ff_scoring"],
        attn_scoring=recipe["attn_scoring"],
        offset_mode=recipe["offset_mode"],
        selection=recipe["selection"],
        ff_eps=args.eps,
        attn_eps=args.eps,
        steps=steps,
        random_baseline=random_baseline,
        seed=seed,
        collect=CollectConfig(batch_size=256, sample_tokens=10**9),  # every train image of both sets
        eval=EVAL,
    )


def run(
    classifier: ImageClassifier,
    cfg: PruneConfig,
    train: dict[str, ImageSet],
    eval_sets: dict[str, ImageSet],
    random_counts: list[tuple[list[int], list[int]]] | None = None,
) -> tuple[list[StepReport], list[NeuronMask]]:
    """One run's reports and the mask after each of them (step 0 included)."""
    masks: list[NeuronMask] = []
    callbacks = PruneCallbacks(on_step=lambda _report, mask: masks.append(mask))
    measure = ImageMeasure(classifier, cfg, (train["forget"], train["retain"]), eval_sets, callbacks)
    options = PruneOptions(random_counts=random_counts)
    result = PruneRun.with_measure(classifier, measure, eval_sets, cfg, options, callbacks).run_to_end()
    return result.history, masks


def _losses(report: StepReport, base: StepReport) -> tuple[float, float]:
    """(relative forget drop, retain points lost) of a report against step 0."""
    forget = report.drops["forget"]
    retain = base.metrics["retain"]["top1"] - report.metrics["retain"]["top1"]
    return forget, retain


def choose_on_validation(
    classifier: ImageClassifier, splits: ImageSplits, args: argparse.Namespace
) -> tuple[float, int, list[dict[str, Any]]]:
    """(fraction, steps) by the rule in the module docstring, and every candidate's validation curve."""
    train, val = _sets(splits, "train", args.forget_class), _sets(splits, "validation", args.forget_class)
    sweep, qualifying, fallback = [], [], []
    fracs: list[float] = args.fracs
    for frac in fracs:
        steps = min(args.max_steps, int(1 / frac))
        reports, _ = run(classifier, _config(args, frac, steps), train, val)
        curve = []
        for report in reports[1:]:
            forget, retain = _losses(report, reports[0])
            curve.append({"step": report.step, "forget_drop": forget, "retain_points_lost": retain})
            if retain <= RETAIN_LIMIT:
                fallback.append((forget - retain, -frac, frac, report.step))
                if forget >= FORGET_TARGET:
                    qualifying.append((retain, frac, report.step))
                    break
        sweep.append({"frac": frac, "curve": curve})
    if qualifying:
        _, frac, steps = min(qualifying)
    else:  # nothing met the target on validation: the best separation within the retain limit
        _, _, frac, steps = max(fallback) if fallback else (0.0, 0.0, fracs[0], 1)
    return frac, steps, sweep


def _correct(classifier: ImageClassifier, mask: NeuronMask, images: ImageSet) -> torch.Tensor:
    """Per-image top-1 hits [image] through `mask`."""
    with apply_mask(classifier.model, classifier.sites, mask):
        return image_rows(classifier.model, images, topk=EVAL.topk, batch_size=EVAL.batch_size)[:, TOP1]


def _separation(base: dict[str, torch.Tensor], now: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forget drop minus retain drop (relative), per resample: inputs are [resample] accuracies."""
    drop = {k: (base[k] - now[k]) / base[k].clamp_min(1e-12) for k in ("forget", "retain")}
    return drop["forget"] - drop["retain"]


def compare(
    classifier: ImageClassifier,
    eval_sets: dict[str, ImageSet],
    selective: list[NeuronMask],
    randoms: list[list[NeuronMask]],
    n_samples: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per step: selective and mean-random separations, their difference and its paired 95% interval."""
    g = torch.Generator().manual_seed(seed)
    # Resample weights [resample, image] per set, shared by every mask so the comparison is paired.
    weights = {}
    for name, images in eval_sets.items():
        idx = torch.randint(len(images), (n_samples, len(images)), generator=g)
        weights[name] = torch.zeros(n_samples, len(images), dtype=torch.float64).scatter_add_(
            1, idx, torch.ones_like(idx, dtype=torch.float64)
        ) / len(images)

    def accuracies(mask: NeuronMask) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        hits = {name: _correct(classifier, mask, images) for name, images in eval_sets.items()}
        return {k: float(v.mean()) for k, v in hits.items()}, {k: weights[k] @ v for k, v in hits.items()}

    base_point, base_boot = accuracies(selective[0])
    rows = []
    for step in range(1, len(selective)):
        sel_point, sel_boot = accuracies(selective[step])
        rand = [accuracies(masks[step]) for masks in randoms]
        rand_point = {k: sum(r[0][k] for r in rand) / len(rand) for k in eval_sets}
        sel_sep = _separation(base_boot, sel_boot)
        rand_sep = torch.stack([_separation(base_boot, r[1]) for r in rand]).mean(0)
        diff = sel_sep - rand_sep
        lo, hi = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        point = {k: torch.tensor(v) for k, v in base_point.items()}
        rows.append(
            {
                "step": step,
                "selective_separation": float(
                    _separation(point, {k: torch.tensor(v) for k, v in sel_point.items()})
                ),
                "random_separation": float(
                    _separation(point, {k: torch.tensor(v) for k, v in rand_point.items()})
                ),
                "difference_ci": [lo, hi],
                "random_accuracy_mean": rand_point,
            }
        )
        rows[-1]["difference"] = rows[-1]["selective_separation"] - rows[-1]["random_separation"]
    return rows


def _fmt(metrics: dict[str, Any]) -> str:
    lo, hi = metrics["ci"]["top1"]
    return f"{100 * metrics['top1']:5.1f} [{100 * lo:5.1f},{100 * hi:5.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forget-class", type=int, default=0)
    parser.add_argument("--fracs", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.05])
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--components", choices=["ff", "ff+attn"], default="ff+attn")
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument(
        "--hidden-size",
        type=int,
        default=VitRecipe().hidden_size,
        help="the ViT's width (bench/vit_recipes.py)",
    )
    parser.add_argument(
        "--intermediate-size", type=int, default=VitRecipe().intermediate_size, help="FF neurons per layer"
    )
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="paper",
        help="scoring, ablation and selection: the paper's (abs, zero, global) or selprune's default",
    )
    parser.add_argument("--random-seeds", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    recipe = replace(VitRecipe(), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size)
    classifier, info = load_digits_vit(ensure_digits_vit(args.cache, recipe))
    splits = load_digits_splits(recipe.split)
    c = args.forget_class
    frac, steps, sweep = choose_on_validation(classifier, splits, args)
    print(
        f"model: held-out accuracy {100 * info['accuracy']['heldout']:.1f}% (trained in {info['train_seconds']} s)"
    )
    print(
        f"chosen on validation: {args.components} frac {frac} x {steps} steps, {args.recipe} recipe, eps {args.eps} (forget class {c})"
    )

    train, held = _sets(splits, "train", c), _sets(splits, "heldout", c)
    sel_reports, sel_masks = run(classifier, _config(args, frac, steps), train, held)
    counts = [(r.ff_per_layer, r.attn_per_layer) for r in sel_reports[1:]]
    rand_runs = [
        run(classifier, _config(args, frac, steps, random_baseline=True, seed=s), train, held, counts)
        for s in range(args.random_seeds)
    ]
    comparison = compare(classifier, held, sel_masks, [masks for _, masks in rand_runs])

    print(
        f"\nheld-out top-1 % [95% CI]; forget = class {c} ({len(held['forget'])} images), retain = other classes ({len(held['retain'])})"
    )
    print(f"{'step':>4} {'pruned':>7} | {'sel forget':>19} {'sel retain':>19} | {'rnd forget':>19} {'rnd retain':>19} | sep diff [95% CI]")  # fmt: skip
    rand0 = rand_runs[0][0]
    for i, report in enumerate(sel_reports):
        m, r = report.metrics, rand0[i].metrics
        diff = ""
        if i > 0:
            row = comparison[i - 1]
            diff = f"{row['difference']:+.3f} [{row['difference_ci'][0]:+.3f},{row['difference_ci'][1]:+.3f}]"
        print(f"{report.step:>4} {report.ff_pruned + report.attn_pruned:>7} | {_fmt(m['forget'])} {_fmt(m['retain'])} | {_fmt(r['forget'])} {_fmt(r['retain'])} | {diff}")  # fmt: skip

    forget_drop, retain_lost = _losses(sel_reports[-1], sel_reports[0])
    targets = {
        "forget_drop_ge_80pct": forget_drop >= FORGET_TARGET,
        "retain_loss_le_5pts": retain_lost <= RETAIN_LIMIT,
        "beats_random_every_step_point": all(row["difference"] > 0 for row in comparison),
        "beats_random_every_step_ci": all(row["difference_ci"][0] > 0 for row in comparison),
    }
    print(
        f"\nfinal: forget drop {100 * forget_drop:.1f}% relative, retain lost {100 * retain_lost:.2f} points"
    )
    print(
        "(random columns: seed 0; sep diff: selective minus the mean of", args.random_seeds, "random seeds)"
    )
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'MISSED'}")
    seconds = time.perf_counter() - started
    print(f"wall time {seconds:.1f} s")
    if args.json:
        figures = {
            "command": " ".join(["python", *sys.argv]),
            "settings": {
                **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "chosen_ff_frac": frac,
                "chosen_steps": steps,
                "prune_config": asdict(_config(args, frac, steps)),
                "forget_target": FORGET_TARGET,
                "retain_limit": RETAIN_LIMIT,
            },
            "model": info,
            "validation_sweep": sweep,
            "selective": [r.as_dict() for r in sel_reports],
            "random": [[r.as_dict() for r in reports] for reports, _ in rand_runs],
            "comparison": comparison,
            "targets": targets,
            "final": {"forget_drop": forget_drop, "retain_points_lost": retain_lost},
            "seconds": seconds,
        }
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
