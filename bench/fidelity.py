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

Modules: bench/experiments.py (the planned runs and budgets), bench/fidelity_runner.py (runs them),
bench/fidelity_report.py (the document; its sections in paper_report.py, recipes_report.py and
detox_report.py, shared tables and verdicts in fidelity_tables.py). This file is the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.experiments import BUDGETS, EXPERIMENTS  # noqa: E402
from bench.fidelity_runner import ROOT, Harness  # noqa: E402


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
