"""Relearning attack: does the forgotten capability come back after a little fine-tuning?

Runs the demo job (`selprune prune` with the demo's settings: forget python_code, keep english_prose,
under the retain budget) to get a selective-pruning mask, then fine-tunes the embedded model on N
forget-train texts for a fixed budget (--steps optimizer steps of --batch-size texts, --token-limit
tokens each), for each N in --n: once through the mask (the mask's hooks stay on, so only kept neurons
can learn) and once from the unpruned model, for comparison. Each fine-tuned model is evaluated on the
held-out texts (top-1 accuracy with 95% bootstrap intervals), and the mask's relearned share is

    recovered = (top1 after relearning through the mask - top1 of the mask) / (top1 of the base - top1 of the mask)

on the forget set: 0 means nothing came back, 1 means the base model's accuracy is back.

Membership inference (selprune_core/membership.py): the loss attack's AUC on the first --mia-texts
forget-train texts (the part the job samples its statistics from) against the held-out code, for the
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
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from selprune.local_commands import DEMO_PARAMS
from selprune_core.config import EvalConfig
from selprune_core.corpora import TextSplits, load_builtin
from selprune_core.evaluation import EvalResult, evaluate_sets
from selprune_core.finetune import FinetuneConfig, finetune
from selprune_core.loading import EMBEDDED_MODEL, LoadedModel, load_model
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.membership import membership_inference
from selprune_core.sites import resolve_sites

ROOT = Path(__file__).resolve().parent.parent


def demo_mask(cache: Path, out: Path) -> Path:
    """The demo job's mask, made by `selprune prune` with the demo's settings."""
    budget = DEMO_PARAMS["budget"]
    command = [
        str(Path(sys.executable).parent / "selprune"), "prune", "--out", str(out), "--cache-dir", str(cache),
        "--steps", str(DEMO_PARAMS["steps"]), "--dtype", "float32",
        "--collect-tokens", str(DEMO_PARAMS["collect_tokens"]), "--eval-tokens", str(DEMO_PARAMS["eval_tokens"]),
        "--token-limit", str(DEMO_PARAMS["token_limit"]),
        "--max-retain-ppl-increase", str(budget["max_retain_ppl_increase"]),
        "--forget-target", str(budget["forget_target"]),
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT)
    (path,) = sorted(out.glob("*.safetensors"))
    return path


def add_setting_args(parser: argparse.ArgumentParser) -> None:
    """The flags bench/relearn.py and bench/baselines.py share: the mask, the evaluation and the cache."""
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--token-limit", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=1_000)
    parser.add_argument("--mia-texts", type=int, default=60, help="forget-train texts taken as members")
    parser.add_argument(
        "--mask", help="a mask file (.safetensors from selprune prune); default: run the demo job"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--cache-dir", default=os.environ.get("SELPRUNE_CACHE_DIR", str(Path.home() / ".cache/selprune"))
    )


@dataclass
class Setting:
    """What both benches work on: the mask, the embedded model (fp32) and the demo job's data."""

    mask_path: Path
    mask: NeuronMask
    mask_seconds: float | None  # the demo job's wall time, when this run made the mask
    base: LoadedModel
    code: TextSplits  # forget: python_code
    prose: TextSplits  # retain: english_prose
    sets: dict[str, list[str]]  # held-out forget and retain texts
    eval_cfg: EvalConfig  # held-out evaluation, with intervals
    mia_cfg: EvalConfig  # every text of a membership set
    members: list[str]  # the forget-train texts the job samples its statistics from


def load_setting(args: argparse.Namespace) -> Setting:
    cache = Path(args.cache_dir)
    started = time.perf_counter()
    made = args.mask is None
    mask_path = (
        demo_mask(cache, Path(tempfile.mkdtemp(prefix="selprune-bench-mask-"))) if made else Path(args.mask)
    )
    mask_seconds = time.perf_counter() - started if made else None
    mask = NeuronMask.load(mask_path)
    print(f"mask {mask.mask_id}: {mask_path}", flush=True)
    code, prose = load_builtin("python_code", cache), load_builtin("english_prose", cache)
    return Setting(
        mask_path=mask_path,
        mask=mask,
        mask_seconds=mask_seconds,
        base=load_model(EMBEDDED_MODEL, cache_dir=cache, device="cpu", dtype="float32"),
        code=code,
        prose=prose,
        sets={"forget": list(code.heldout), "retain": list(prose.heldout)},
        eval_cfg=EvalConfig(token_limit=256, sample_tokens=args.eval_tokens, bootstrap_samples=1_000),
        mia_cfg=EvalConfig(token_limit=256, sample_tokens=10**9, bootstrap_samples=1_000),
        members=list(code.train[: args.mia_texts]),
    )


def membership(setting: Setting, loaded: LoadedModel, mask: NeuronMask | None) -> dict[str, Any]:
    """The loss attack on the setting's members against the held-out forget texts, through `mask`."""
    members, nonmembers, cfg = setting.members, setting.sets["forget"], setting.mia_cfg
    if mask is None:
        return asdict(membership_inference(loaded.model, loaded.tokenizer, members, nonmembers, cfg))
    with apply_mask(loaded.model, loaded.sites, mask):
        return asdict(membership_inference(loaded.model, loaded.tokenizer, members, nonmembers, cfg))


def evaluate(
    loaded: LoadedModel, sets: dict[str, list[str]], cfg: EvalConfig, mask: NeuronMask | None
) -> dict[str, EvalResult]:
    if mask is None:
        return evaluate_sets(loaded.model, loaded.tokenizer, sets, cfg)
    with apply_mask(loaded.model, loaded.sites, mask):
        return evaluate_sets(loaded.model, loaded.tokenizer, sets, cfg)


def summary(results: dict[str, EvalResult]) -> dict[str, Any]:
    return {
        name: {"top1": r.top1, "top1_ci": r.ci.get("top1"), "loss": r.loss} for name, r in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4, 16, 64], help="forget texts the attacker has")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-5)
    add_setting_args(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    setting = load_setting(args)
    mask, base, code, sets, eval_cfg = (
        setting.mask,
        setting.base,
        setting.code,
        setting.sets,
        setting.eval_cfg,
    )
    tune = FinetuneConfig(
        steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size, token_limit=args.token_limit
    )

    before = {
        "base": summary(evaluate(base, sets, eval_cfg, None)),
        "mask": summary(evaluate(base, sets, eval_cfg, mask)),
    }
    # Membership: the forget-train texts the job read its statistics from (members) against held-out code.
    mia = {"base": membership(setting, base, None), "mask": membership(setting, base, mask)}
    print(f"membership AUC: base {mia['base']['auc']:.3f} {mia['base']['ci']}, "
          f"mask {mia['mask']['auc']:.3f} {mia['mask']['ci']}", flush=True)  # fmt: skip
    runs: list[dict[str, Any]] = []
    for n in args.n:
        texts = list(code.train[:n])
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
        "mask": str(setting.mask_path) if args.mask else "demo job",
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
