"""Does bfloat16 keep the embedded model's perplexity within 1% of float32? The check behind dtype "auto".

`dtype=auto` picks bfloat16 on a CPU with native bf16 instructions (AVX512-BF16 or AMX) and on GPUs
that support it (selprune_core/devices.py). This loads the embedded model in float32 and in bfloat16
on one device, evaluates both on the held-out texts of the built-in sets of the default job (forget
`python_code`, retain `english_prose`), and prints per set the perplexity in each dtype, their
relative difference and the tokens/s of each. The rounds alternate the dtypes so that machine noise
hits both alike; perplexities come from the first round (later rounds only time the same texts), the
speed ratio is the median of the per-round ratios.

The last lines are name=value pairs:

    bf16_ppl_rel_diff_max   largest |ppl_bf16 / ppl_fp32 - 1| over the sets (the bar: 0.01)
    bf16_vs_fp32_speed      bf16 tokens/s over fp32 tokens/s (median over rounds, both sets together)
    auto_dtype              what dtype "auto" gives on this device, and why
    verdict                 pass when bf16 is within the bar; exit status 1 when it is not *and* auto
                            picks bf16 here (then auto must not pick it on this hardware)

Usage: python bench/dtype_check.py [--device cpu] [--eval-tokens 1500] [--token-limit 256]
       [--batch-size 8] [--rounds 2] [--sets python_code,english_prose]
Budget: under 3 minutes on 2 CPU cores with the defaults.
"""

# ruff: noqa: E402  (torch may only be imported after the OpenMP setting)
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# As the worker does (worker/settings.py apply_process_defaults): idle OpenMP threads sleep, so a
# neighbour process on shared cores does not slow both dtypes' forwards by spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from selprune_core.config import EvalConfig
from selprune_core.corpora import load_builtin
from selprune_core.devices import choose_dtype, resolve_device
from selprune_core.evaluation import evaluate_texts
from selprune_core.loading import EMBEDDED_MODEL, LoadedModel, load_model

BAR = 0.01  # bf16 perplexity within 1% of fp32
DTYPES = ("float32", "bfloat16")


def _cache_dir() -> Path:
    # The same default as the CLI (SELPRUNE_CACHE_DIR or ~/.cache/selprune); read here, not in the core.
    return Path(os.environ.get("SELPRUNE_CACHE_DIR") or Path.home() / ".cache" / "selprune")


def _timed(loaded: LoadedModel, texts: list[str], cfg: EvalConfig) -> tuple[float, int, float]:
    """(perplexity, predictions scored, seconds) of one evaluation."""
    start = time.perf_counter()
    result = evaluate_texts(loaded.model, loaded.tokenizer, texts, cfg)
    return result.perplexity, result.n_tokens, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default cpu)")
    parser.add_argument("--eval-tokens", type=int, default=1500, help="predictions scored per set and dtype")
    parser.add_argument("--token-limit", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds (alternating the dtypes)")
    parser.add_argument("--sets", default="python_code,english_prose", help="built-in sets, comma-separated")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    cache_dir = _cache_dir()
    cfg = EvalConfig(
        token_limit=args.token_limit,
        sample_tokens=args.eval_tokens,
        batch_size=args.batch_size,
        bootstrap_samples=0,
    )
    sets = {name: load_builtin(name, cache_dir, max_texts=400).heldout for name in args.sets.split(",")}
    models = {
        dtype: load_model(EMBEDDED_MODEL, cache_dir=cache_dir, device=str(device), dtype=dtype)
        for dtype in DTYPES
    }
    for loaded in models.values():  # warm-up: first-call allocations and kernel selection
        evaluate_texts(loaded.model, loaded.tokenizer, next(iter(sets.values()))[:2], cfg)
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds"
    )

    ppl: dict[tuple[str, str], float] = {}
    tokens: dict[tuple[str, str], int] = {}
    seconds: dict[tuple[str, str], float] = {key: 0.0 for key in ((s, d) for s in sets for d in DTYPES)}
    ratios: list[float] = []
    for round_no in range(args.rounds):
        spent = dict.fromkeys(DTYPES, 0.0)
        counted = dict.fromkeys(DTYPES, 0)
        for name, texts in sets.items():
            order = DTYPES if round_no % 2 == 0 else DTYPES[::-1]
            for dtype in order:
                value, n, took = _timed(models[dtype], texts, cfg)
                if round_no == 0:
                    ppl[name, dtype], tokens[name, dtype] = value, n
                seconds[name, dtype] += took
                spent[dtype] += took
                counted[dtype] += n
        ratios.append((counted["bfloat16"] / spent["bfloat16"]) / (counted["float32"] / spent["float32"]))

    diffs = []
    for name in sets:
        fp32, bf16 = ppl[name, "float32"], ppl[name, "bfloat16"]
        diff = abs(bf16 / fp32 - 1.0)
        diffs.append(diff)
        speed = {d: tokens[name, d] * args.rounds / seconds[name, d] for d in DTYPES}
        print(
            f"{name}: {tokens[name, 'float32']} predictions; perplexity fp32 {fp32:.4f}, bf16 {bf16:.4f}, "
            f"relative difference {diff:.4%}; tokens/s fp32 {speed['float32']:.0f}, bf16 {speed['bfloat16']:.0f}"
        )
    worst = max(diffs)
    auto, why = choose_dtype("auto", device)
    auto_name = str(auto).removeprefix("torch.")
    passed = worst < BAR
    print(f"bf16_ppl_rel_diff_max={worst:.6f}")
    print(f"bf16_vs_fp32_speed={statistics.median(ratios):.3f}")
    print(f"auto_dtype={auto_name} ({why})")
    print(f"verdict={'pass' if passed else 'fail'} (bar {BAR:.0%})")
    if not passed and auto is torch.bfloat16:
        print(f"bf16 misses the {BAR:.0%} bar here, but auto picks it on this device: auto must stay float32")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
