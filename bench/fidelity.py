"""Reproduce the paper's findings on one model: selective vs random pruning, with 95% bootstrap CIs.

    python bench/fidelity.py <experiment|all|report> [--budget full|smoke] [--model REF] [--dtype bf16]

Experiments (each selective run is paired with a random-pruning run at the same fractions):

    code_vs_prose   forget python_code / retain english_prose, and the reverse           (paper Fig. 2)
    ff_vs_attn      feed-forward only vs attention only vs both                          (paper Table 1)
    importance      importance functions freq, abs, rms, std for FF neurons              (paper Fig. 4)
    toxicity        forget toxic / retain english_prose; toxic-continuation rate of held-out prompts
    sensitivity     per-step fraction and number of steps at the same total fraction
    collect_budget  the main FF run again with 4x the statistics tokens (a robustness check)

Every run uses the service's own code path (selprune_core: load_model, resolve_dataset on builtin
corpora, prune_iteratively with a PruneConfig, evaluate_sets and toxicity_metric inside it). Each run is
written to docs/results/runs/<run>.json after every step, so an interrupted run keeps its finished
steps; a finished run whose settings did not change is reused by later experiments instead of rerun.
`report` regenerates docs/results.md and the plots from the JSON alone (bench/fidelity_report.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("fidelity")


@dataclass(frozen=True)
class Budget:
    """Compute budget shared by every run; `full` was fixed from timing alone, before any pruning run."""

    token_limit: int = 256  # per-text truncation for collection and evaluation (paper: 1000)
    collect_tokens: int = 4000  # tokens per dataset per statistics collection (paper: 1e5)
    eval_tokens: int = 3000  # non-common-token predictions per eval set per step (paper: 1e5)
    bootstrap: int = 1000  # bootstrap resamples for the 95% intervals
    batch_size: int = 8
    max_steps: int | None = None  # caps every run's steps (smoke tests only)
    tox_prompts: int | None = None  # None: all held-out toxic_prompts
    tox_samples: int = 1  # continuations per prompt
    tox_new_tokens: int = 32  # paper: 200
    tox_threshold: float = 0.8  # the paper's Detoxify threshold, applied to the profanity scorer


BUDGETS = {
    "full": Budget(),
    "smoke": Budget(
        token_limit=32,
        collect_tokens=150,
        eval_tokens=60,
        bootstrap=50,
        max_steps=2,
        tox_prompts=4,
        tox_new_tokens=4,
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """One pruning trajectory; fractions are per step, as in PruneConfig."""

    name: str
    forget: str  # builtin corpus names
    retain: str
    ff_frac: float = 0.02
    attn_frac: float = 0.0
    scoring: str = "abs"  # importance function for both components
    steps: int = 6
    random: bool = False
    tox_steps: tuple[int, ...] = ()  # steps at which the toxic-continuation rate is measured
    collect_tokens: int | None = None  # overrides the budget's statistics tokens (the budget check)
    # PruneConfig / CollectConfig overrides naming a recipe, e.g. (("offset_mode", "retain_mean"),)
    recipe: tuple[tuple[str, Any], ...] | None = None
    # "validation": statistics on the train texts minus a validation carve-out, which is evaluated;
    # None: statistics on all train texts, the held-out texts evaluated.
    split: str | None = None
    seed: int | None = None  # the random baseline's seed (default 0)
    match: str | None = None  # random baseline: copy this selective run's per-layer counts per step
    # BudgetConfig fields: the run adapts its step size, checked on a validation carve-out of train
    budget: tuple[tuple[str, Any], ...] | None = None
    tox_samples: int | None = None  # continuations per toxicity prompt (default: the budget's)
    tox_final: bool | None = None  # also measure toxicity on the final mask, whatever its step
    extra_eval: tuple[str, ...] | None = None  # more builtin corpora evaluated (held-out) every step


def _pair(spec: RunSpec, random_steps: int | None = None) -> list[RunSpec]:
    """A selective run and its random baseline at the same per-step fractions. `random_steps` lets the
    baseline go on further, so its curve reaches the retain drops of the selective run (random
    pruning costs only evaluations)."""
    rand = replace(
        spec, name=spec.name.rsplit("_", 1)[0] + "_random", random=True, steps=random_steps or spec.steps
    )
    if spec.tox_steps:  # step 0 is the same unpruned model in both runs: measure it once
        rand = replace(rand, tox_steps=tuple(s for s in spec.tox_steps if s > 0))
    return [spec, rand]


_CODE = dict(forget="python_code", retain="english_prose")


def _detox_random(seed: int) -> RunSpec:
    """Random pruning with detox_selprune's per-layer counts at every step."""
    return RunSpec(
        f"detox_random_s{seed}",
        forget="toxic_continuations",
        retain="clean_continuations",
        ff_frac=0.01,
        steps=8,
        random=True,
        seed=seed,
        match="detox_selprune",
        recipe=(("offset_mode", dict(_recipe("selprune"))["offset_mode"]),),
        tox_final=True,
        tox_samples=2,
        extra_eval=("english_prose",),
    )


def _recipe(name: str) -> tuple[tuple[str, Any], ...]:
    """A named recipe's method settings (protocol.RECIPES) as RunSpec overrides."""
    from protocol import RECIPES

    return tuple(sorted(RECIPES[name].items()))


# Paper defaults (method.md §3.5, §5): abs importance, 2% of FF neurons per step; attention-only
# comparisons at 2% of attention neurons; toxicity with abs for both components at 0.5% per step for 10
# steps. Only the number of steps is cut (6 instead of 50) to fit the CPU budget.
# The baselines of (a) and (b) run twice as many steps: the selective runs' retain drops outgrow what
# random pruning reaches at the same fraction, and the paper's claim is about the curves.
EXPERIMENTS: dict[str, list[RunSpec]] = {
    "code_vs_prose": [
        *_pair(RunSpec("code_ff_abs", **_CODE), random_steps=12),
        *_pair(RunSpec("prose_ff_abs", forget="english_prose", retain="python_code"), random_steps=12),
    ],
    "ff_vs_attn": [
        *_pair(RunSpec("code_ff_abs", **_CODE), random_steps=12),
        *_pair(RunSpec("code_attn_abs", **_CODE, ff_frac=0.0, attn_frac=0.02), random_steps=12),
        *_pair(RunSpec("code_both_abs", **_CODE, ff_frac=0.02, attn_frac=0.02), random_steps=12),
    ],
    "importance": [
        *[RunSpec(f"code_ff_{s}", **_CODE, scoring=s) for s in ("freq", "abs", "rms", "std")],
        RunSpec("code_ff_random", **_CODE, random=True, steps=12),
    ],
    "toxicity": _pair(
        RunSpec(
            "tox_both_abs",
            forget="toxic",
            retain="english_prose",
            ff_frac=0.005,
            attn_frac=0.005,
            steps=10,
            tox_steps=(0, 10),
        )
    ),
    # Same total (12% of FF neurons) reached in 6, 3, 2 and 1 steps, then in 12 steps of 1% (last,
    # the most expensive).
    "sensitivity": [
        *_pair(RunSpec("code_ff_abs", **_CODE), random_steps=12),
        *_pair(RunSpec("code_ff4_abs", **_CODE, ff_frac=0.04, steps=3)),
        *_pair(RunSpec("code_ff6_abs", **_CODE, ff_frac=0.06, steps=2)),
        *_pair(RunSpec("code_ff12_abs", **_CODE, ff_frac=0.12, steps=1)),
        *_pair(RunSpec("code_ff1_abs", **_CODE, ff_frac=0.01, steps=12)),
    ],
    # Choosing the defaults (issue 9): each change alone against the paper recipe, on a validation
    # split carved from the train texts (held-out texts are never read), FF at 2%/step for 6 steps.
    "recipes_val": [
        RunSpec("val_paper", **_CODE, split="validation"),
        RunSpec("val_skip1", **_CODE, split="validation", recipe=(("skip_first", 1),)),
        RunSpec("val_skip4", **_CODE, split="validation", recipe=(("skip_first", 4),)),
        RunSpec("val_pack", **_CODE, split="validation", recipe=(("pack", True),)),
        RunSpec("val_mean", **_CODE, split="validation", recipe=(("offset_mode", "retain_mean"),)),
        RunSpec(
            "val_dev_mean",
            **_CODE,
            split="validation",
            recipe=(("ff_scoring", "dev"), ("offset_mode", "retain_mean")),
        ),
        RunSpec("val_absout", **_CODE, split="validation", recipe=(("ff_scoring", "abs_out"),)),
        RunSpec("val_layer", **_CODE, split="validation", recipe=(("selection", "per_layer"),)),
    ],
    # Gradient attribution (added after the activation-statistics recipes above all stayed near a 36%
    # forget drop at a 5% retain drop on the validation split).
    # Combinations of the changes that did best alone on the validation split (run after those).
    "recipes_val_combo": [
        RunSpec(
            "val_combo",
            **_CODE,
            split="validation",
            recipe=(("ff_scoring", "dev"), ("offset_mode", "retain_mean"), ("selection", "per_layer")),
        ),
        RunSpec(
            "val_combo_out",
            **_CODE,
            split="validation",
            recipe=(("ff_scoring", "dev_out"), ("offset_mode", "retain_mean"), ("selection", "per_layer")),
        ),
    ],
    # Exploratory: 3 steps each (a step costs about 4x an activation-statistics step on the CPU).
    "recipes_val_taylor": [
        RunSpec(
            "val_taylor_mean",
            **_CODE,
            steps=3,
            split="validation",
            recipe=(("ff_scoring", "taylor_mean"), ("offset_mode", "retain_mean")),
        ),
        RunSpec("val_taylor", **_CODE, steps=3, split="validation", recipe=(("ff_scoring", "taylor"),)),
    ],
    # Held-out: the paper's recipe, each change alone, the chosen default, matched random x 3.
    "keep": [
        RunSpec("keep_paper", **_CODE, recipe=_recipe("paper")),
        RunSpec("keep_mean", **_CODE, recipe=(("offset_mode", "retain_mean"),)),
        RunSpec("keep_dev_mean", **_CODE, recipe=(("ff_scoring", "dev"), ("offset_mode", "retain_mean"))),
        RunSpec("keep_absout", **_CODE, recipe=(("ff_scoring", "abs_out"),)),
        RunSpec("keep_selprune", **_CODE, recipe=_recipe("selprune")),
        *[
            RunSpec(
                f"keep_random_s{seed}",
                **_CODE,
                random=True,
                seed=seed,
                match="keep_selprune",
                recipe=(("offset_mode", dict(_recipe("selprune"))["offset_mode"]),),
            )
            for seed in range(3)
        ],
    ],
    # The default demo job's settings (selprune demo) on held-out texts: the retain budget steers on a
    # validation carve-out of the train texts.
    "keep_budget": [
        RunSpec(
            "keep_budget",
            **_CODE,
            steps=10,
            recipe=_recipe("selprune"),
            budget=(("max_retain_ppl_increase", 0.1), ("forget_target", 0.6)),
        ),
    ],
    # Toxicity (issue 9): the paper's recipe on the old data (forget toxic prompt prefixes, retain
    # English prose) against the same-register recipe (forget the model's own flagged continuations,
    # keep its unflagged ones) with the default method and a retain budget, and random pruning matched
    # to the latter's per-layer counts (3 seeds). Toxicity: 5 continuations of each held-out prompt.
    "detox": [
        RunSpec(
            "detox_paper",
            forget="toxic",
            retain="english_prose",
            ff_frac=0.005,
            attn_frac=0.005,
            steps=10,
            recipe=_recipe("paper"),
            tox_steps=(0,),
            tox_final=True,
            tox_samples=5,
            extra_eval=("clean_continuations",),
        ),
        RunSpec(
            "detox_selprune",
            forget="toxic_continuations",
            retain="clean_continuations",
            ff_frac=0.01,
            steps=8,
            recipe=_recipe("selprune"),
            budget=(("max_retain_ppl_increase", 0.1),),
            tox_final=True,
            tox_samples=5,
            extra_eval=("english_prose",),
        ),
    ],
    # Its random baselines, split in two experiments so that two processes share the 2 cores; 2 samples
    # per prompt (468 continuations) to fit the session's CPU time, against 5 for the runs above.
    "detox_random_a": [_detox_random(0), _detox_random(1)],
    "detox_random_b": [_detox_random(2)],
    # Does the 25x smaller statistics budget matter? The main run again with 4x the tokens.
    "collect_budget": [
        RunSpec("code_ff_abs", **_CODE),
        RunSpec("code_ff_abs16k", **_CODE, collect_tokens=16_000),
        RunSpec("code_ff_random", **_CODE, random=True, steps=12),
    ],
}


@dataclass
class Harness:
    model_ref: str
    dtype: str
    device: str
    budget_name: str
    cache_dir: Path
    out_dir: Path
    command: str
    # Taken once at start: the code is imported once, so later commits do not change what runs.
    git_commit: str = field(default_factory=lambda: _git_commit())
    git_dirty: bool | None = field(default_factory=lambda: _git_dirty())
    _loaded: Any = None
    _datasets: dict[str, Any] = field(default_factory=dict)

    @property
    def budget(self) -> Budget:
        return BUDGETS[self.budget_name]

    def loaded(self) -> Any:
        from selprune_core import load_model

        if self._loaded is None:
            self._loaded = load_model(
                self.model_ref, cache_dir=self.cache_dir, device=self.device, dtype=self.dtype
            )
        return self._loaded

    def dataset(self, name: str) -> Any:
        from selprune_core import BuiltinRef, resolve_dataset
        from selprune_core.corpora import MODEL_BUILTINS

        if name not in self._datasets:
            if name in MODEL_BUILTINS:  # the model's own continuations, generated once and cached
                from selprune_core.self_contrast import builtin_contrast

                loaded = self.loaded()
                flagged, clean = builtin_contrast(
                    loaded.model, loaded.tokenizer, loaded.fingerprint, self.cache_dir
                )
                self._datasets["toxic_continuations"], self._datasets["clean_continuations"] = flagged, clean
            else:
                self._datasets[name] = resolve_dataset(
                    BuiltinRef(name), data_root=ROOT, cache_dir=self.cache_dir
                )
        return self._datasets[name]

    def config(self, spec: RunSpec) -> Any:
        from selprune_core import BudgetConfig, CollectConfig, EvalConfig, PruneConfig

        b = self.budget
        steps = min(spec.steps, b.max_steps) if b.max_steps else spec.steps
        recipe = dict(spec.recipe or ())
        collect_keys = {"skip_first", "pack"}
        return PruneConfig(
            ff_frac=spec.ff_frac,
            attn_frac=spec.attn_frac,
            ff_scoring=recipe.pop("ff_scoring", spec.scoring),
            attn_scoring=recipe.pop("attn_scoring", spec.scoring),
            steps=steps,
            random_baseline=spec.random,
            seed=spec.seed or 0,
            budget=BudgetConfig(**dict(spec.budget)) if spec.budget else None,
            **{k: v for k, v in recipe.items() if k not in collect_keys},
            collect=CollectConfig(
                token_limit=b.token_limit,
                sample_tokens=spec.collect_tokens or b.collect_tokens,
                batch_size=b.batch_size,
                **{k: v for k, v in recipe.items() if k in collect_keys},
            ),
            eval=EvalConfig(
                token_limit=b.token_limit,
                sample_tokens=b.eval_tokens,
                batch_size=b.batch_size,
                bootstrap_samples=b.bootstrap,
                seed=0,
            ),
        )

    def tox_config(self, spec: RunSpec | None = None) -> Any:
        from selprune_core import SamplingConfig, ToxicityConfig

        b = self.budget
        samples = (spec.tox_samples if spec else None) or b.tox_samples
        sampling = SamplingConfig(
            max_new_tokens=b.tox_new_tokens, temperature=1.0, top_k=50, top_p=1.0, seed=0
        )
        return ToxicityConfig(
            scorer="profanity", samples_per_prompt=samples, threshold=b.tox_threshold, sampling=sampling
        )

    def run_key(self, spec: RunSpec) -> str:
        """Changes whenever anything that affects a run's numbers changes."""
        blob = json.dumps(
            # Unset optional fields are left out, so adding one keeps the keys of existing runs.
            [
                {k: v for k, v in asdict(spec).items() if v is not None},
                asdict(self.budget),
                self.model_ref,
                self.dtype,
                self.device,
            ],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @staticmethod
    def all_specs() -> list[RunSpec]:
        return [spec for specs in EXPERIMENTS.values() for spec in specs]

    def run_path(self, spec: RunSpec) -> Path:
        return self.out_dir / "runs" / f"{spec.name}.json"

    def run(self, spec: RunSpec) -> dict[str, Any]:
        path = self.run_path(spec)
        key = self.run_key(spec)
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("key") == key and old.get("complete"):
                log.info("%s: reusing %s", spec.name, path)
                return dict(old)
        return self._run(spec, path, key)

    def _run(self, spec: RunSpec, path: Path, key: str) -> dict[str, Any]:
        from selprune_core import apply_mask, get_scorer, prune_iteratively, toxicity_metric
        from selprune_core.data import carve_validation

        loaded = self.loaded()
        cfg = self.config(spec)
        forget, retain = self.dataset(spec.forget), self.dataset(spec.retain)
        forget_train, retain_train = forget.train, retain.train
        eval_sets = {"forget": forget.heldout, "retain": retain.heldout}
        for extra_name in spec.extra_eval or ():
            eval_sets[extra_name] = self.dataset(extra_name).heldout
        budget_sets = None
        if spec.split == "validation" or spec.budget:
            (forget_train, forget_val), (retain_train, retain_val) = map(
                carve_validation, (forget.train, retain.train)
            )
            if spec.split == "validation":  # choosing a recipe: held-out texts are never read
                eval_sets = {"forget": forget_val, "retain": retain_val}
            else:  # the budget steers on validation texts; held-out texts only measure
                budget_sets = {"forget": forget_val, "retain": retain_val}
        random_counts = None
        if spec.match is not None:
            matched = self.run(next(s for s in self.all_specs() if s.name == spec.match))
            random_counts = [
                (r["ff_per_layer"], r["attn_per_layer"])
                for r in matched["steps"]
                if r["step"] > 0 and r.get("accepted", True)
            ]
        record: dict[str, Any] = {
            "run": spec.name,
            "key": key,
            "spec": asdict(spec),
            "budget": asdict(self.budget),
            "budget_name": self.budget_name,
            "model": self.model_ref,
            "dtype": self.dtype,
            "device": self.device,
            "fingerprint": loaded.fingerprint,
            "totals": {
                "ff": loaded.sites.n_layers * loaded.sites.d_mlp,
                "attn": loaded.sites.n_layers * loaded.sites.d_attn,
            },
            "forget": forget.name,
            "retain": retain.name,
            "n_train_texts": {"forget": len(forget.train), "retain": len(retain.train)},
            "command": self.command,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "steps": [],
            "complete": False,
        }
        tox_steps = set(spec.tox_steps)
        if self.budget.max_steps:  # smoke budgets shorten runs: measure at their last step instead
            tox_steps = {min(s, cfg.n_steps) for s in tox_steps}
        prompts: tuple[str, ...] = ()
        if tox_steps or spec.tox_final:
            prompts = self.dataset("toxic_prompts").heldout[: self.budget.tox_prompts]
            record["toxicity_prompts"] = {"corpus": "builtin:toxic_prompts (held-out)", "n": len(prompts)}
        calls = [0]

        def toxicity(mask: Any) -> dict[str, Any]:
            with apply_mask(loaded.model, loaded.sites, mask):
                tox = toxicity_metric(
                    loaded.model,
                    loaded.tokenizer,
                    prompts,
                    self.tox_config(spec),
                    get_scorer("profanity"),
                    bootstrap_samples=self.budget.bootstrap,
                    seed=0,
                    batch_size=16,
                )
            return dict(tox.as_dict())

        def extra_metrics(mask: Any) -> dict[str, Any]:
            # Called once per evaluated step, step 0 first; it gets the mask, so apply it here.
            step, calls[0] = calls[0], calls[0] + 1
            return {"toxicity": toxicity(mask)} if step in tox_steps else {}

        started = time.monotonic()

        def on_step(report: Any, mask: Any) -> None:
            record["steps"].append(report.as_dict())
            record["wall_s"] = round(time.monotonic() - started, 1)
            # Timing only: budgets are fixed in advance, so progress logs carry no held-out numbers.
            log.info("%s: step %d done in %.0f s", spec.name, report.step, report.seconds)
            _write_json(path, record)

        result = prune_iteratively(
            loaded.model,
            loaded.tokenizer,
            loaded.sites,
            loaded.fingerprint,
            forget_train,
            retain_train,
            eval_sets,
            cfg,
            random_counts=random_counts,
            budget_sets=budget_sets,
            on_step=on_step,
            extra_metrics=extra_metrics if tox_steps else None,
        )
        if spec.tox_final:
            record["final_toxicity"] = {"step": result.history[-1].step, **toxicity(result.mask)}
        record.update(
            complete=True,
            stopped_reason=result.stopped_reason,
            wall_s=round(time.monotonic() - started, 1),
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        _write_json(path, record)
        return record

    def experiment(self, name: str) -> None:
        started = time.monotonic()
        exp_path = self.out_dir / f"{name}.json"
        doc: dict[str, Any] = {
            "experiment": name,
            "command": self.command,
            "budget_name": self.budget_name,
            "budget": asdict(self.budget),
            "model": self.model_ref,
            "dtype": self.dtype,
            "device": self.device,
            "git_commit": self.git_commit,
            "git_dirty": self.git_dirty,
            "cpu_count": os.cpu_count(),
            "runs": {},
            "complete": False,
        }
        for spec in EXPERIMENTS[name]:
            doc["runs"][spec.name] = self.run(spec)
            doc["wall_s"] = round(time.monotonic() - started, 1)
            _write_json(exp_path, doc)
        doc["complete"] = True
        _write_json(exp_path, doc)
        log.info("experiment %s finished in %.0f s", name, time.monotonic() - started)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # readers (the report) never see a half-written file


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()
    except OSError:
        return ""


def _git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (their numbers may then not reproduce from it)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=[*EXPERIMENTS, "all", "report"])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out", default=str(ROOT / "docs"), help="writes <out>/results.md and <out>/results/"
    )
    parser.add_argument(
        "--cache-dir", default=os.environ.get("SELPRUNE_CACHE_DIR", str(Path.home() / ".cache/selprune"))
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the 2-core machine is shared; oversubscribed OpenMP is 2-4x slower)",
    )
    parser.add_argument("--no-report", action="store_true", help="skip regenerating results.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("selprune_core").setLevel(logging.WARNING)
    out = Path(args.out)
    if args.what != "report":
        from worker.settings import apply_process_defaults

        apply_process_defaults()  # OMP_WAIT_POLICY=PASSIVE before torch loads: the cores are shared
        import torch

        torch.manual_seed(0)
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        harness = Harness(
            model_ref=args.model,
            dtype=args.dtype,
            device=args.device,
            budget_name=args.budget,
            cache_dir=Path(args.cache_dir),
            out_dir=out / "results",
            command="python bench/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        )
        for name in EXPERIMENTS if args.what == "all" else [args.what]:
            harness.experiment(name)
    if not args.no_report:
        from bench.fidelity_report import write_report

        write_report(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
