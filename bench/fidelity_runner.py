"""Runs the planned experiments (bench/experiments.py) through the service's own code path.

Every run uses selprune_core as the worker does: load_model, resolve_dataset on builtin corpora,
prune_iteratively with a PruneConfig (evaluate_sets and toxicity_metric inside it). Each run is written to
<out>/results/runs/<run>.json after every step, and each experiment to <out>/results/<experiment>.json.
The command line is bench/fidelity.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.experiments import BUDGETS, EXPERIMENTS, Budget, RunSpec

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("fidelity")


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
        from selprune_core.splits import carve_validation

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
            loaded,
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
