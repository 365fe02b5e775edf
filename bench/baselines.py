"""Selective pruning against the gradient-based unlearning baselines, at matched retain cost.

Bench-only methods (they change every weight, so a baseline is a whole model, not a mask the service
can serve next to others): gradient ascent on the forget texts, gradient difference (ascent on forget,
descent on retain) and task arithmetic (fine-tune on forget, subtract alpha times the delta). Each runs
on the embedded model (fp32) with the same data as the task's selective mask (bench/setting.py:
`--task code` forgets python_code and keeps english_prose, `--task toxicity` forgets the model's toxic
continuations and keeps its clean ones) and is evaluated on held-out texts at checkpoints: every --eval-every steps for the
gradient methods, every alpha in --alphas for task arithmetic. The checkpoint compared is the one with
the largest forget top-1 drop whose retain top-1 drop is at most the selective mask's (matched retain
cost); when none is that cheap, the cheapest is shown and marked unmatched.

Each compared model then gets the relearning attack (fine-tuned on --relearn-n forget-train texts for
--relearn-steps steps) and the loss attack's membership AUC (bench/relearn.py describes both), and
the toxic-continuation rate on held-out toxic prompts (task toxicity), and the wall time each method
took (the mask: its `selprune prune` run, when this bench made it).

Budget (2-core CPU, defaults): gradient methods 20 steps x 4 texts x 128 tokens with 4 checkpoints
each, task arithmetic 20 steps and 4 alphas, evaluations of 1,000 predictions per set; about 15 minutes
for --task code once the mask exists (the demo job adds 2-3 minutes). --task toxicity adds 100
32-token continuations per compared model; its first run generates the contrast corpora (about 10
minutes, cached).

Usage: python bench/baselines.py [--task code|toxicity] [--mask PATH] [--steps 20] [--lr 2e-5] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.setting import add_setting_args, evaluate, load_setting, membership, summary, toxicity  # noqa: E402
from selprune_core.evaluation import relative_drop  # noqa: E402
from selprune_core.finetune import FinetuneConfig, finetune, subtract_task_vector  # noqa: E402
from selprune_core.loading import LoadedModel  # noqa: E402
from selprune_core.masks import NeuronMask  # noqa: E402
from selprune_core.sites import resolve_sites  # noqa: E402


def drops(base: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    return {
        f"{name}_drop": relative_drop(base[name]["top1"], after[name]["top1"])
        for name in ("forget", "retain")
    }


def pick(checkpoints: list[dict[str, Any]], retain_cost: float) -> dict[str, Any]:
    """The checkpoint with the largest forget drop at a retain drop <= retain_cost, else the cheapest."""
    within = [c for c in checkpoints if c["retain_drop"] <= retain_cost]
    if within:
        return {**max(within, key=lambda c: c["forget_drop"]), "matched": True}
    return {**min(checkpoints, key=lambda c: c["retain_drop"]), "matched": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--relearn-n", type=int, default=16)
    parser.add_argument("--relearn-steps", type=int, default=10)
    add_setting_args(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    setting = load_setting(args)
    mask, base, sets, eval_cfg = setting.mask, setting.base, setting.sets, setting.eval_cfg
    train_forget, train_retain = list(setting.forget.train), list(setting.retain.train)

    def tune_cfg(objective: str, steps: int) -> FinetuneConfig:
        return FinetuneConfig(
            steps=steps,
            learning_rate=args.lr,
            batch_size=args.batch_size,
            token_limit=args.token_limit,
            objective=objective,  # type: ignore[arg-type]
        )

    def attacks(loaded: LoadedModel, use_mask: NeuronMask | None) -> dict[str, Any]:
        """Relearning (forget top-1 after fine-tuning on a few forget texts), membership AUC, and the
        toxic-continuation rate (task toxicity)."""
        mia = membership(setting, loaded, use_mask)
        model = copy.deepcopy(loaded.model)
        sites = resolve_sites(model)
        relearn_texts = train_forget[: args.relearn_n]
        finetune(
            model,
            loaded.tokenizer,
            relearn_texts,
            tune_cfg("descent", args.relearn_steps),
            sites=sites,
            mask=use_mask,
        )
        relearned = summary(
            evaluate(dataclasses.replace(loaded, model=model, sites=sites), sets, eval_cfg, use_mask)
        )
        return {
            "membership": mia,
            "toxicity": toxicity(setting, loaded, use_mask),
            "relearned_forget_top1": relearned["forget"]["top1"],
            "relearned_forget_top1_ci": relearned["forget"]["top1_ci"],
        }

    base_eval = summary(evaluate(base, sets, eval_cfg, None))
    mask_eval = summary(evaluate(base, sets, eval_cfg, mask))
    retain_cost = drops(base_eval, mask_eval)["retain_drop"]
    rows: dict[str, Any] = {
        "unpruned": {"eval": base_eval, **drops(base_eval, base_eval), **attacks(base, None), "seconds": 0.0},
        "selective_pruning": {
            "eval": mask_eval,
            **drops(base_eval, mask_eval),
            **attacks(base, mask),
            "seconds": setting.mask_seconds,
        },
    }
    print(
        f"selective mask: retain drop {retain_cost:.3f}, forget drop {rows['selective_pruning']['forget_drop']:.3f}",
        flush=True,
    )

    def gradient_baseline(objective: str) -> dict[str, Any]:
        """Train with `objective`, evaluating checkpoints; the matched checkpoint's row. Seconds count
        training only (checkpoint evaluations are timed apart and left out)."""
        model = copy.deepcopy(base.model)
        loaded = dataclasses.replace(base, model=model, sites=resolve_sites(model))
        checkpoints: list[dict[str, Any]] = []
        states: dict[int, Any] = {}
        clock = {"start": time.perf_counter(), "evaluating": 0.0}

        def checkpoint(step: int) -> None:
            if step % args.eval_every and step != args.steps:
                return
            t0 = time.perf_counter()
            seconds = t0 - clock["start"] - clock["evaluating"]
            result = summary(evaluate(loaded, sets, eval_cfg, None))
            checkpoints.append(
                {"steps": step, "eval": result, **drops(base_eval, result), "seconds": seconds}
            )
            states[step] = copy.deepcopy(model.state_dict())
            print(f"{objective} step {step}: {drops(base_eval, result)}", flush=True)
            clock["evaluating"] += time.perf_counter() - t0

        cfg = tune_cfg(objective, args.steps)
        finetune(model, base.tokenizer, train_forget, cfg, retain_texts=train_retain, on_step=checkpoint)
        chosen = pick(checkpoints, retain_cost)
        model.load_state_dict(states[chosen["steps"]])
        return {**chosen, **attacks(loaded, None), "checkpoints": checkpoints}

    for objective in ("ascent", "difference"):
        rows[f"gradient_{objective}"] = gradient_baseline(objective)

    tuned = copy.deepcopy(base.model)
    clock = time.perf_counter()
    finetune(tuned, base.tokenizer, train_forget, tune_cfg("descent", args.steps))
    tune_seconds = time.perf_counter() - clock
    model = copy.deepcopy(base.model)
    loaded = dataclasses.replace(base, model=model, sites=resolve_sites(model))
    checkpoints = []
    for alpha in args.alphas:
        subtract_task_vector(model, base.model, tuned, alpha)
        result = summary(evaluate(loaded, sets, eval_cfg, None))
        checkpoints.append(
            {"alpha": alpha, "eval": result, **drops(base_eval, result), "seconds": tune_seconds}
        )
        print(f"task arithmetic alpha {alpha}: {drops(base_eval, result)}", flush=True)
    chosen = pick(checkpoints, retain_cost)
    subtract_task_vector(model, base.model, tuned, chosen["alpha"])
    rows["task_arithmetic"] = {**chosen, **attacks(loaded, None), "checkpoints": checkpoints}

    # The machine's load next to the wall times: they move with whatever else runs on the 2 cores.
    figures = {"task": setting.task, "load_average": os.getloadavg(), "command": " ".join(["python", *sys.argv]), "mask_id": mask.mask_id, "retain_cost": retain_cost, "settings": vars(args), "rows": rows,
               "seconds": time.perf_counter() - started}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    print(
        f"{'method':<20} {'forget drop':>11} {'retain drop':>11} {'matched':>7} {'relearned fgt top1':>18} {'MIA AUC':>8}"
        f" {'toxic rate':>10}"
    )
    for name, row in rows.items():
        print(
            f"{name:<20} {row['forget_drop']:>11.3f} {row['retain_drop']:>11.3f} {str(row.get('matched', '-')):>7} "
            f"{row['relearned_forget_top1']:>18.3f} {row['membership']['auc']:>8.3f} "
            f"{row['toxicity']['toxic_rate'] if row['toxicity'] else float('nan'):>10.3f}"
        )
    # One name=value line (bench/gpu.sh collects these): forget drop at matched cost, per method.
    print(
        " ".join(
            f"{name}_forget_drop={row['forget_drop']:.3f}" for name, row in rows.items() if name != "unpruned"
        )
    )


if __name__ == "__main__":
    main()
