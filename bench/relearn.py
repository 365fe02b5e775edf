"""Relearning attack: does the forgotten capability come back after a little fine-tuning?

Makes the task's selective-pruning mask (bench/setting.py: `--task code` runs the demo job, forget
python_code and keep english_prose under the retain budget; `--task toxicity` the detox preset), then fine-tunes the embedded model on N
forget-train texts for a fixed budget (--steps optimizer steps of --batch-size texts, --token-limit
tokens each), for each N in --n: once through the mask (the mask's hooks stay on, so only kept neurons
can learn) and once from the unpruned model, for comparison. Each fine-tuned model is evaluated on the
held-out texts (top-1 accuracy with 95% bootstrap intervals), and the mask's relearned share is

    recovered = (top1 after relearning through the mask - top1 of the mask) / (top1 of the base - top1 of the mask)

on the forget set: 0 means nothing came back, 1 means the base model's accuracy is back.

Membership inference (selprune_core/membership.py): the loss attack's AUC on the first --mia-texts
forget-train texts (the part the job samples its statistics from) against the held-out forget texts, for the
base model and through the mask, with 95% bootstrap intervals.

Budget (fits the 2-core CPU machine: about 10 minutes with the defaults, fp32): the prune job about 2
minutes, each fine-tuning 10 steps x 4 texts x 128 tokens, each evaluation 1,000 predictions per set.

Usage: python bench/relearn.py [--n 4 16 64] [--steps 10] [--lr 5e-5] [--mask PATH] [--json PATH]
The last line is `relearn_recovered_n<N>=<share> ...` for every N.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.setting import add_setting_args, evaluate, load_setting, membership, summary  # noqa: E402
from selprune_core.finetune import FinetuneConfig, finetune  # noqa: E402
from selprune_core.sites import resolve_sites  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4, 16, 64], help="forget texts the attacker has")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-5)
    add_setting_args(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    setting = load_setting(args)
    mask, base, sets, eval_cfg = setting.mask, setting.base, setting.sets, setting.eval_cfg
    tune = FinetuneConfig(
        steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size, token_limit=args.token_limit
    )

    before = {
        "base": summary(evaluate(base, sets, eval_cfg, None)),
        "mask": summary(evaluate(base, sets, eval_cfg, mask)),
    }
    # Membership: the forget-train texts the job read its statistics from (members) against held-out ones.
    mia = {"base": membership(setting, base, None), "mask": membership(setting, base, mask)}
    print(f"membership AUC: base {mia['base']['auc']:.3f} {mia['base']['ci']}, "
          f"mask {mia['mask']['auc']:.3f} {mia['mask']['ci']}", flush=True)  # fmt: skip
    runs: list[dict[str, Any]] = []
    for n in args.n:
        texts = list(setting.forget.train[:n])
        for start in ("base", "mask"):
            model = copy.deepcopy(base.model)
            sites = resolve_sites(model)
            report = finetune(
                model, base.tokenizer, texts, tune, sites=sites, mask=mask if start == "mask" else None
            )
            tuned = dataclasses.replace(base, model=model, sites=sites)
            after = summary(evaluate(tuned, sets, eval_cfg, mask if start == "mask" else None))
            runs.append(
                {
                    "n": n,
                    "start": start,
                    "after": after,
                    "train_tokens": report.tokens,
                    "train_seconds": report.seconds,
                }
            )
            print(f"n={n} from {start}: forget top1 {before[start]['forget']['top1']:.3f} -> {after['forget']['top1']:.3f}, "
                  f"retain {before[start]['retain']['top1']:.3f} -> {after['retain']['top1']:.3f} "
                  f"({report.tokens} tokens, {report.seconds:.0f} s)", flush=True)  # fmt: skip
            del model, tuned

    gap = before["base"]["forget"]["top1"] - before["mask"]["forget"]["top1"]
    recovered = {
        r["n"]: (r["after"]["forget"]["top1"] - before["mask"]["forget"]["top1"]) / gap if gap > 0 else None
        for r in runs
        if r["start"] == "mask"
    }
    figures = {
        "task": setting.task,
        "command": " ".join(["python", *sys.argv]),
        "mask": str(setting.mask_path) if args.mask else "made by this run",
        "mask_id": mask.mask_id,
        "settings": {**vars(args), "eval_token_limit": eval_cfg.token_limit},
        "before": before,
        "membership": mia,
        "runs": runs,
        "recovered": recovered,
        "prune_seconds": setting.mask_seconds,
        "seconds": time.perf_counter() - started,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    print(
        " ".join(
            f"relearn_recovered_n{n}={v:.3f}" if v is not None else f"relearn_recovered_n{n}=nan"
            for n, v in recovered.items()
        )
    )


if __name__ == "__main__":
    main()
