"""Unlearn code from a small masked LM by selective pruning, keeping prose, against matched random pruning.

The model is the code/prose MLM of selprune_core.mlm_model (a small RoBERTa trained once offline on
the built-in corpora, cached). Statistics are collected on unmasked train texts (docs/method.md §6.3):
forget = `python_code`, retain = `english_prose`, the train split less the validation texts carved
from it (`splits.carve_validation`; the model never trained on those). Evaluation is masked-token
top-1 (selprune_core.mlm_eval: 15% of the non-special tokens, 80/10/10, seeded by the eval seed, so
every step and every random run is scored on the same masked positions), each text truncated to what
the model's positions hold, with 95% bootstrap intervals over texts.

Settings are chosen on the *validation* texts only: for each candidate (components, per-step
fraction) a run of up to `--max-steps` steps is evaluated on validation code and prose, and the
(candidate, step) with the largest separation (relative top-1 drop of code minus that of prose) among
those whose prose drop stays within `RETAIN_LIMIT` wins (ties: fewer neurons). Scoring is the paper's
`abs` importance (docs/method.md §3.5) with its eps (FF 1e-3, attention 1e-4). The held-out split is
then measured with those settings, once.

The random baseline prunes, at every step, exactly the selective run's per-layer counts of new neurons
(several seeds). "Selective" means the held-out separation is above 0 with its 95% paired-bootstrap
interval; "more so than random" compares separations step by step, selective minus the mean over the
random seeds, with a paired bootstrap over held-out texts (code and prose texts resampled separately,
the same resample scoring the base model, the selective mask and every random mask).

Usage: python bench/mlm_code.py [--fracs 0.02 0.05] [--components ff ff+attn] [--max-steps 8]
                                [--random-seeds 3] [--cache-dir DIR] [--json docs/results/mlm_code.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from selprune_core.config import CollectConfig, EvalConfig, PruneConfig
from selprune_core.evaluation import N_PRED, TOP1
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.mlm_eval import mlm_rows
from selprune_core.mlm_measure import MaskedLM, MlmMeasure
from selprune_core.mlm_model import MlmRecipe, code_prose_texts, ensure_code_prose_mlm, load_code_prose_mlm
from selprune_core.pruning import PruneCallbacks, PruneOptions, PruneRun
from selprune_core.reports import StepReport

FORGET, RETAIN = "python_code", "english_prose"
RETAIN_LIMIT = 0.10  # relative prose top-1 drop a chosen setting may cost on validation
EVAL = EvalConfig(sample_tokens=10**9, batch_size=16, bootstrap_samples=1000, skip_common=0, seed=0)
COLLECT = CollectConfig(batch_size=16, sample_tokens=50_000)  # per set and step; prose has ~25k in all


def _config(
    components: str, frac: float, steps: int, random_baseline: bool = False, seed: int = 0
) -> PruneConfig:
    return PruneConfig(
        ff_frac=frac,
        attn_frac=frac if components == "ff+attn" else 0.0,
        ff_scoring="abs",
        attn_scoring="abs",
        steps=steps,
        random_baseline=random_baseline,
        seed=seed,
        collect=COLLECT,
        eval=EVAL,
    )


def run(
    target: MaskedLM,
    cfg: PruneConfig,
    train: dict[str, tuple[str, ...]],
    eval_sets: dict[str, tuple[str, ...]],
    random_counts: list[tuple[list[int], list[int]]] | None = None,
) -> tuple[list[StepReport], list[NeuronMask], MlmMeasure]:
    """One run's reports, the mask after each (step 0 included) and its measure (for the plans)."""
    masks: list[NeuronMask] = []
    callbacks = PruneCallbacks(on_step=lambda _report, mask: masks.append(mask))
    measure = MlmMeasure(target, cfg, (train["forget"], train["retain"]), eval_sets, callbacks=callbacks)
    options = PruneOptions(random_counts=random_counts)
    result = PruneRun.with_measure(target, measure, eval_sets, cfg, options, callbacks).run_to_end()
    return result.history, masks, measure


def _drops(report: StepReport) -> tuple[float, float]:
    return report.drops["forget"], report.drops["retain"]


def choose_on_validation(
    target: MaskedLM, texts: dict[str, dict[str, tuple[str, ...]]], args: argparse.Namespace
) -> tuple[str, float, int, list[dict[str, Any]]]:
    """(components, fraction, steps) by the rule in the module docstring, and every candidate's curve."""
    train = {"forget": texts[FORGET]["train"], "retain": texts[RETAIN]["train"]}
    val = {"forget": texts[FORGET]["validation"], "retain": texts[RETAIN]["validation"]}
    sweep, best = [], None
    for components in args.components:
        for frac in args.fracs:
            steps = min(args.max_steps, int(1 / frac))
            reports, _, _ = run(target, _config(components, frac, steps), train, val)
            curve = []
            for report in reports[1:]:
                forget, retain = _drops(report)
                curve.append({"step": report.step, "forget_drop": forget, "retain_drop": retain})
                pruned = report.ff_pruned + report.attn_pruned
                if retain <= RETAIN_LIMIT and (best is None or (forget - retain, -pruned) > best[0]):
                    best = ((forget - retain, -pruned), components, frac, report.step)
            sweep.append({"components": components, "frac": frac, "curve": curve})
    if best is None:  # nothing within the prose limit: the smallest step of the first candidate
        return args.components[0], args.fracs[0], 1, sweep
    return best[1], best[2], best[3], sweep


def _rows(target: MaskedLM, measure: MlmMeasure, mask: NeuronMask) -> dict[str, torch.Tensor]:
    """Per-text (hits, predictions) [text, 2] of every eval set through `mask`."""
    with apply_mask(target.model, target.sites, mask):
        return {
            name: mlm_rows(target.model, plan, EVAL)[:, [TOP1, N_PRED]]
            for name, plan in measure.eval_plans.items()
        }


def compare(
    target: MaskedLM,
    measure: MlmMeasure,
    selective: list[NeuronMask],
    randoms: list[list[NeuronMask]],
    n_samples: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per step: selective and mean-random separations, their difference and its paired 95% interval."""
    g = torch.Generator().manual_seed(seed)
    weights = {}  # [resample, text] draw counts per set, shared by every mask so the comparison is paired
    for name, plan in measure.eval_plans.items():
        idx = torch.randint(plan.n_texts, (n_samples, plan.n_texts), generator=g)
        weights[name] = torch.zeros(n_samples, plan.n_texts, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones_like(idx, dtype=torch.float64)
        )

    def accuracies(mask: NeuronMask) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        rows = _rows(target, measure, mask)
        point = {k: float(v[:, 0].sum() / v[:, 1].sum()) for k, v in rows.items()}
        boot = {k: (weights[k] @ v[:, 0]) / (weights[k] @ v[:, 1]) for k, v in rows.items()}  # [resample]
        return point, boot

    def separation(base: dict[str, Any], now: dict[str, Any]) -> Any:
        drop = {k: (base[k] - now[k]) / base[k] for k in ("forget", "retain")}
        return drop["forget"] - drop["retain"]

    base_point, base_boot = accuracies(selective[0])
    out = []
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    for step in range(1, len(selective)):
        sel_point, sel_boot = accuracies(selective[step])
        rand = [accuracies(masks[step]) for masks in randoms]
        sel_sep = separation(base_boot, sel_boot)  # [resample]
        rand_sep = torch.stack([separation(base_boot, r[1]) for r in rand]).mean(0)
        rand_point = sum(separation(base_point, r[0]) for r in rand) / len(rand)
        sel_lo, sel_hi = torch.quantile(sel_sep, q).tolist()
        lo, hi = torch.quantile(sel_sep - rand_sep, q).tolist()
        sel = separation(base_point, sel_point)
        out.append(
            {
                "step": step,
                "selective_separation": sel,
                "selective_separation_ci": [sel_lo, sel_hi],
                "random_separation": rand_point,
                "difference": sel - rand_point,
                "difference_ci": [lo, hi],
            }
        )
    return out


def _fmt(metrics: dict[str, Any]) -> str:
    lo, hi = metrics["ci"]["top1"]
    return f"{100 * metrics['top1']:5.1f} [{100 * lo:5.1f},{100 * hi:5.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fracs", type=float, nargs="+", default=[0.02, 0.05])
    parser.add_argument("--components", nargs="+", choices=["ff", "ff+attn"], default=["ff", "ff+attn"])
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 was faster on the loaded 2-core dev box)"
    )
    parser.add_argument(
        "--cache-dir", default=os.environ.get("SELPRUNE_CACHE_DIR", str(Path.home() / ".cache/selprune"))
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir)
    target, info = load_code_prose_mlm(ensure_code_prose_mlm(cache, MlmRecipe()))
    started = time.perf_counter()
    texts = code_prose_texts(cache)
    components, frac, steps, sweep = choose_on_validation(target, texts, args)
    print(f"model: held-out masked top-1 code {info['accuracy'][FORGET]['heldout']['top1']:.3f}, prose {info['accuracy'][RETAIN]['heldout']['top1']:.3f}")  # fmt: skip
    print(f"chosen on validation: {components} {frac} x {steps} steps, abs")

    train = {"forget": texts[FORGET]["train"], "retain": texts[RETAIN]["train"]}
    held = {"forget": texts[FORGET]["heldout"], "retain": texts[RETAIN]["heldout"]}
    sel_reports, sel_masks, measure = run(target, _config(components, frac, steps), train, held)
    counts = [(r.ff_per_layer, r.attn_per_layer) for r in sel_reports[1:]]
    rand_runs = [
        run(target, _config(components, frac, steps, random_baseline=True, seed=s), train, held, counts)
        for s in range(args.random_seeds)
    ]
    comparison = compare(target, measure, sel_masks, [masks for _, masks, _ in rand_runs])

    print("\nheld-out masked top-1 % [95% CI]; forget = python_code, retain = english_prose")
    print(f"{'step':>4} {'pruned':>7} | {'sel code':>19} {'sel prose':>19} | {'rnd code':>19} {'rnd prose':>19} | sep diff [95% CI]")  # fmt: skip
    for i, report in enumerate(sel_reports):
        m, r = report.metrics, rand_runs[0][0][i].metrics
        diff = ""
        if i > 0:
            row = comparison[i - 1]
            diff = f"{row['difference']:+.3f} [{row['difference_ci'][0]:+.3f},{row['difference_ci'][1]:+.3f}]"
        print(f"{report.step:>4} {report.ff_pruned + report.attn_pruned:>7} | {_fmt(m['forget'])} {_fmt(m['retain'])} | {_fmt(r['forget'])} {_fmt(r['retain'])} | {diff}")  # fmt: skip

    final = comparison[-1]
    forget_drop, retain_drop = _drops(sel_reports[-1])
    targets = {
        "selective_final_ci": final["selective_separation_ci"][0] > 0,
        "beats_random_final_ci": final["difference_ci"][0] > 0,
        "beats_random_every_step_point": all(row["difference"] > 0 for row in comparison),
        "beats_random_every_step_ci": all(row["difference_ci"][0] > 0 for row in comparison),
        "retain_drop_within_limit": retain_drop <= RETAIN_LIMIT,
    }
    print(f"\nfinal: code drop {100 * forget_drop:.1f}%, prose drop {100 * retain_drop:.1f}% (relative)")
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'MISSED'}")
    seconds = time.perf_counter() - started
    print(f"wall time {seconds:.1f} s (model cached)")
    if args.json:
        figures = {
            "command": " ".join(["python", *sys.argv]),
            "settings": {
                **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "chosen_components": components,
                "chosen_frac": frac,
                "chosen_steps": steps,
                "retain_limit": RETAIN_LIMIT,
                "prune_config": asdict(_config(components, frac, steps)),
            },
            "model": info,
            "validation_sweep": sweep,
            "selective": [r.as_dict() for r in sel_reports],
            "random": [[r.as_dict() for r in reports] for reports, _, _ in rand_runs],
            "comparison": comparison,
            "targets": targets,
            "final": {"forget_drop": forget_drop, "retain_drop": retain_drop},
            "seconds": seconds,
        }
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
