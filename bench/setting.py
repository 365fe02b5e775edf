"""What bench/relearn.py and bench/baselines.py share: a task's mask, model, data and attacks.

Two tasks, both on the embedded model in fp32 (on the CPU unless --device says otherwise):

* ``code``: forget python_code, keep english_prose; the mask is the demo job's (`selprune demo`'s
  settings, run through `selprune prune`).
* ``toxicity``: forget the model's own toxic continuations of toxic prompts, keep its clean
  continuations of the same prompts (the ``detox`` preset's data and method settings, run through
  `selprune prune`); besides next-token accuracy, the toxic-continuation rate on held-out toxic prompts.

Membership inference takes the first --mia-texts forget-train texts (the part the job samples its
statistics from) as members and the held-out forget texts as non-members.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from protocol.params import PRESETS
from selprune.local_commands import DEMO_PARAMS
from selprune_core.config import EvalConfig, SamplingConfig, ToxicityConfig
from selprune_core.corpora import TextSplits, load_builtin
from selprune_core.evaluation import EvalResult, evaluate_sets
from selprune_core.loading import EMBEDDED_MODEL, LoadedModel, load_model
from selprune_core.masking import apply_mask
from selprune_core.masks import NeuronMask
from selprune_core.membership import membership_inference
from selprune_core.self_contrast import builtin_contrast
from selprune_core.toxicity import get_scorer, toxicity_metric

ROOT = Path(__file__).resolve().parent.parent
Task = Literal["code", "toxicity"]
TASK_DATA: dict[str, tuple[str, str]] = {  # forget, retain (builtin corpora)
    "code": ("python_code", "english_prose"),
    "toxicity": ("toxic_continuations", "clean_continuations"),
}


def prune_flags(task: Task) -> list[str]:
    """`selprune prune` flags for the task's mask: the demo job's settings, or the detox preset's."""
    forget, retain = TASK_DATA[task]
    flags = ["--forget", f"builtin:{forget}", "--retain", f"builtin:{retain}"]
    if task == "code":
        budget = DEMO_PARAMS["budget"]
        return flags + [
            "--steps", str(DEMO_PARAMS["steps"]),
            "--collect-tokens", str(DEMO_PARAMS["collect_tokens"]), "--eval-tokens", str(DEMO_PARAMS["eval_tokens"]),
            "--token-limit", str(DEMO_PARAMS["token_limit"]),
            "--max-retain-ppl-increase", str(budget["max_retain_ppl_increase"]),
            "--forget-target", str(budget["forget_target"]),
        ]  # fmt: skip
    params = PRESETS["detox"]["params"]
    return flags + [
        "--recipe", params["recipe"], "--ff-frac", str(params["ff_frac"]), "--attn-frac", str(params["attn_frac"]),
        "--steps", str(params["steps"]), "--eval-tokens", "1000",
        "--max-retain-ppl-increase", str(params["budget"]["max_retain_ppl_increase"]),
    ]  # fmt: skip


def make_mask(task: Task, cache: Path, out: Path, device: str = "cpu") -> Path:
    """The task's selective-pruning mask, made by `selprune prune` (fp32, like the bench's model)."""
    selprune = str(Path(sys.executable).parent / "selprune")
    command = [selprune, "prune", "--out", str(out), "--cache-dir", str(cache), "--dtype", "float32"]
    command += ["--device", device]
    subprocess.run(command + prune_flags(task), check=True, cwd=ROOT)
    (path,) = sorted(out.glob("*.safetensors"))
    return path


def add_setting_args(parser: argparse.ArgumentParser) -> None:
    """The flags both benches share: the task, the mask, the evaluation and the cache."""
    parser.add_argument("--task", choices=sorted(TASK_DATA), default="code")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--token-limit", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=1_000)
    parser.add_argument("--mia-texts", type=int, default=60, help="forget-train texts taken as members")
    parser.add_argument("--tox-prompts", type=int, default=100, help="held-out toxic prompts (task toxicity)")
    parser.add_argument("--mask", help="the task's mask (.safetensors from selprune prune); default: make it")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the model and the prune job)")
    parser.add_argument(
        "--cache-dir", default=os.environ.get("SELPRUNE_CACHE_DIR", str(Path.home() / ".cache/selprune"))
    )


@dataclass
class Setting:
    """What a bench works on: the mask, the embedded model (fp32) and the task's data."""

    task: Task
    mask_path: Path
    mask: NeuronMask
    mask_seconds: float | None  # the prune job's wall time, when this run made the mask
    base: LoadedModel
    forget: TextSplits
    retain: TextSplits
    sets: dict[str, list[str]]  # held-out forget and retain texts
    eval_cfg: EvalConfig  # held-out evaluation, with intervals
    mia_cfg: EvalConfig  # every text of a membership set
    members: list[str]  # the forget-train texts the job samples its statistics from
    tox_prompts: list[str]  # held-out toxic prompts (task toxicity; empty otherwise)


def load_setting(args: argparse.Namespace) -> Setting:
    cache = Path(args.cache_dir)
    started = time.perf_counter()
    made = args.mask is None
    mask_path = (
        make_mask(args.task, cache, Path(tempfile.mkdtemp(prefix="selprune-bench-mask-")), args.device)
        if made
        else Path(args.mask)
    )
    mask_seconds = time.perf_counter() - started if made else None
    mask = NeuronMask.load(mask_path)
    print(f"mask {mask.mask_id}: {mask_path}", flush=True)
    base = load_model(EMBEDDED_MODEL, cache_dir=cache, device=args.device, dtype="float32")
    if args.task == "toxicity":  # cached by the prune job that made the mask
        forget, retain = builtin_contrast(base.model, base.tokenizer, base.fingerprint, cache)
        tox_prompts = list(load_builtin("toxic", cache).heldout[: args.tox_prompts])
    else:
        forget, retain = (load_builtin(name, cache) for name in TASK_DATA["code"])
        tox_prompts = []
    return Setting(
        task=args.task,
        mask_path=mask_path,
        mask=mask,
        mask_seconds=mask_seconds,
        base=base,
        forget=forget,
        retain=retain,
        sets={"forget": list(forget.heldout), "retain": list(retain.heldout)},
        eval_cfg=EvalConfig(token_limit=256, sample_tokens=args.eval_tokens, bootstrap_samples=1_000),
        mia_cfg=EvalConfig(token_limit=256, sample_tokens=10**9, bootstrap_samples=1_000),
        members=list(forget.train[: args.mia_texts]),
        tox_prompts=tox_prompts,
    )


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


def membership(setting: Setting, loaded: LoadedModel, mask: NeuronMask | None) -> dict[str, Any]:
    """The loss attack on the setting's members against the held-out forget texts, through `mask`."""
    members, nonmembers, cfg = setting.members, setting.sets["forget"], setting.mia_cfg
    if mask is None:
        return asdict(membership_inference(loaded.model, loaded.tokenizer, members, nonmembers, cfg))
    with apply_mask(loaded.model, loaded.sites, mask):
        return asdict(membership_inference(loaded.model, loaded.tokenizer, members, nonmembers, cfg))


def toxicity(setting: Setting, loaded: LoadedModel, mask: NeuronMask | None) -> dict[str, Any] | None:
    """The toxic-continuation rate on the held-out toxic prompts (one 32-token sample each, profanity
    scorer, seed 0), through `mask`; None for a task without prompts."""
    if not setting.tox_prompts:
        return None
    cfg = ToxicityConfig(sampling=SamplingConfig(max_new_tokens=32, seed=0))
    scorer = get_scorer(cfg.scorer)
    if mask is None:
        result = toxicity_metric(loaded.model, loaded.tokenizer, setting.tox_prompts, cfg, scorer)
    else:
        with apply_mask(loaded.model, loaded.sites, mask):
            result = toxicity_metric(loaded.model, loaded.tokenizer, setting.tox_prompts, cfg, scorer)
    out = asdict(result)
    out.pop("examples", None)
    return out
