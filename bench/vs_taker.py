"""Activation collection side by side with the authors' library, taker: tokens/s of each on the same job.

Both sides collect the statistics that pruning scores from (FF and attention pre-out activations of
every layer) over the same model folder (the embedded model), the same texts (the built-in
python_code corpus, train part, in order), each text truncated to the same --token-limit, and both
stop once more than --tokens tokens were counted. taker runs in a subprocess in a venv of its own;
only its collection (`taker.activations.get_midlayer_data`) is timed there, not model loading.
selprune runs here (`collect_activations` over `iter_token_batches`, tokenization included as on
taker's side) at batch size 1 and at the default collection batch size (with --all-fields also at
batch 1 with all five running sums, closer to the amount of statistics taker keeps). The last lines are

    vs_taker_batch1=<selprune tok/s at batch 1 / taker tok/s>
    vs_taker=<selprune tok/s at the default batch size / taker tok/s>

A check line compares mean |x| per neuron of selprune's batch-1 run with taker's (pos_mass - neg_mass):
both see exactly the same tokens, so they must agree to float precision.

Usage: python bench/vs_taker.py [--tokens 2000] [--token-limit 256] [--device cpu|cuda]
       [--dtype float32] [--repeats 1] [--all-fields] [--taker-venv DIR] [--json PATH]

The taker venv (default ~/.cache/selprune/bench/taker-venv) is created when missing with
`python -m venv`, then `pip install torch==2.13.0` first (the local CPU wheel; a plain `pip install
torch` would pull the multi-GB CUDA build), then `pip install taker==1.2.3 transformers==5.24.0`.
taker 1.2.3 only asks for transformers>=4.45.2 and torch>=2.0, so it installs with torch 2.13 as is;
transformers is pinned to the version this bench was verified with (also selprune's), so both sides
run the same model code. A venv that already imports taker is reused untouched.

taker keeps statistics one token at a time in a Python loop (four float64 Welford accumulators plus
a positive count per component, each add backing up its state first), which costs more than its
forward passes on a CPU; the default budget is kept small so that the whole run takes a few minutes
on 2 idle cores. Process CPU seconds are printed beside wall seconds: on a shared machine the wall
figures of the two sides (measured minutes apart) see different loads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from selprune_core.activations import STAT_FIELDS, ActivationStats, collect_activations
from selprune_core.batching import iter_token_batches
from selprune_core.config import CollectConfig
from selprune_core.corpora import load_builtin
from selprune_core.loading import ensure_embedded_model, load_model
from selprune_core.scoring import required_fields

TORCH_SPEC = "torch==2.13.0"
TAKER_SPECS = ("taker==1.2.3", "transformers==5.24.0")
TAKER_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bfp16"}  # taker's own dtype names

# Runs inside the taker venv: argv[1] is a JSON file with the job; the result is one JSON line on stdout.
TAKER_SCRIPT = r"""
import json, sys, time
from importlib.metadata import version
import torch
from taker import activations as A
from taker.data_classes import EvalConfig
from taker.model import Model

job = json.load(open(sys.argv[1]))
m = Model(job["model"], limit=job["token_limit"], model_device=job["device"], dtype=job["dtype"])
sync = torch.cuda.synchronize if m.device.startswith("cuda") else (lambda: None)
# taker reads its texts through HF datasets (unreachable here): hand it our texts in the same shape.
A.prepare_dataset = lambda cfg: [{"text": t} for t in job["texts"]]
forward = {"s": 0.0, "tokens": 0}
inner = A.get_input_activations
def timed(opt, cfg, item):  # the forward pass (with tokenization); the rest is taker's statistics
    start = time.perf_counter()
    ids, other = inner(opt, cfg, item)
    sync()
    forward["s"] += time.perf_counter() - start
    forward["tokens"] += ids.numel()
    return ids, other
A.get_input_activations = timed
cfg = EvalConfig(dataset_name="python_code", dataset_text_key="text")
sync()
start, cpu = time.perf_counter(), time.process_time()
out = A.get_midlayer_data(m, sample_size=job["tokens"], eval_config=cfg)
sync()
seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
abs_mean = lambda s: (s.pos_mass - s.neg_mass).double().reshape(m.cfg.n_layers, -1).cpu().tolist()
print("TAKER_JSON " + json.dumps({
    "seconds": seconds, "cpu_s": cpu_s, "tokens": forward["tokens"], "forward_s": forward["s"],
    "texts": out.texts_viewed, "device": str(m.device), "dtype": str(m.dtype),
    "versions": {p: version(p) for p in ("taker", "torch", "transformers")},
    "ff_abs": abs_mean(out.mlp.orig), "attn_abs": abs_mean(out.attn.orig),
}))
"""


def ensure_taker_venv(venv: Path) -> Path:
    """The venv's python, creating the venv and installing taker when it does not import yet."""
    python = venv / "bin" / "python"
    if (
        python.is_file()
        and subprocess.run([python, "-c", "import taker"], capture_output=True).returncode == 0
    ):
        return python
    print(f"creating the taker venv in {venv} (a few minutes, once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH_SPEC], check=True)  # first, so taker's torch>=2.0 is already met
    subprocess.run([*pip, *TAKER_SPECS], check=True)
    return python


def run_taker(python: Path, job: dict[str, object]) -> dict[str, object]:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
        json.dump(job, handle)
        handle.flush()
        # Offline: the model is a local folder, and taker must not wait on the hub; no progress bars.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        done = subprocess.run(
            [str(python), "-c", TAKER_SCRIPT, handle.name], capture_output=True, text=True, env=env
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("TAKER_JSON ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"taker run failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result: dict[str, object] = json.loads(lines[-1].removeprefix("TAKER_JSON "))
    return result


def max_rel_diff(ours: torch.Tensor, theirs: object) -> float:
    other = torch.tensor(theirs, dtype=torch.float64)
    return float(((ours.cpu() - other).abs() / other.abs().clamp_min(1e-6)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000, help="token budget of each collection")
    parser.add_argument("--token-limit", type=int, default=256, help="per-text truncation, in tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(TAKER_DTYPES))
    parser.add_argument("--repeats", type=int, default=1, help="selprune runs per row (median kept)")
    parser.add_argument(
        "--cache-dir", default=os.environ.get("SELPRUNE_CACHE_DIR", str(Path.home() / ".cache/selprune"))
    )
    parser.add_argument("--taker-venv", default=None, help="default: CACHE_DIR/bench/taker-venv")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--all-fields", action="store_true", help="add a batch-1 row with all running sums")
    args = parser.parse_args()

    cache_dir = Path(args.cache_dir).expanduser()
    venv = Path(args.taker_venv).expanduser() if args.taker_venv else cache_dir / "bench" / "taker-venv"
    taker_python = ensure_taker_venv(venv)
    model_dir = ensure_embedded_model(cache_dir)
    # Far more texts than the budget needs (short files end early); both sides stop at the budget.
    max_texts = 4 * (args.tokens // args.token_limit + 1) + 32
    texts = load_builtin("python_code", cache_dir, max_texts=max_texts).train

    job = {
        "model": str(model_dir),
        "texts": texts,
        "tokens": args.tokens,
        "token_limit": args.token_limit,
        "device": args.device,
        "dtype": TAKER_DTYPES[args.dtype],
    }
    taker = run_taker(taker_python, job)

    loaded = load_model(str(model_dir), cache_dir=cache_dir, device=args.device, dtype=args.dtype)
    sync: Callable[[], None] = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)

    def collect(batch_size: int, which: tuple[str, ...]) -> tuple[float, float, ActivationStats]:
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        # Lazy batches: tokenization is timed too, as it is on taker's side.
        batches = iter_token_batches(
            loaded.tokenizer, texts, token_limit=args.token_limit, batch_size=batch_size, device=loaded.device
        )
        stats = collect_activations(
            loaded.model, loaded.sites, batches, sample_tokens=args.tokens, which=which
        )
        sync()
        return time.perf_counter() - start, time.process_time() - cpu, stats

    default_fields = required_fields("abs", "abs")  # what the default job collects
    default_batch = CollectConfig().batch_size
    variants = {
        "selprune_b1": (1, default_fields),
        f"selprune_b{default_batch}": (default_batch, default_fields),
    }
    if args.all_fields:
        variants["selprune_all_b1"] = (1, STAT_FIELDS)
    warm = iter_token_batches(loaded.tokenizer, texts[:1], token_limit=args.token_limit, batch_size=1)
    collect_activations(loaded.model, loaded.sites, warm, sample_tokens=1, which=default_fields)  # warm-up
    rows: dict[str, dict[str, object]] = {}
    b1_stats: ActivationStats | None = None
    for name, (batch_size, which) in variants.items():
        runs = [collect(batch_size, which) for _ in range(args.repeats)]
        seconds = statistics.median(s for s, _, _ in runs)
        cpu_s = statistics.median(c for _, c, _ in runs)
        stats = runs[0][2]
        b1_stats = stats if name == "selprune_b1" else b1_stats
        rows[name] = {
            "batch_size": batch_size,
            "fields": list(which),
            "tokens": stats.n_tokens,
            "texts": stats.n_texts,
            "seconds": seconds,
            "cpu_s": cpu_s,
            "tok_s": stats.n_tokens / seconds,
        }
    taker_tok_s = float(taker["tokens"]) / float(taker["seconds"])  # type: ignore[arg-type]
    assert b1_stats is not None
    check = {
        "ff": max_rel_diff(b1_stats.ff.abs, taker["ff_abs"]),
        "attn": max_rel_diff(b1_stats.attn.abs, taker["attn_abs"]),
    }

    print(
        f"budget: >{args.tokens} tokens of builtin:python_code (train, in order), token_limit={args.token_limit}, "
        f"model={model_dir}, device={loaded.device}, dtype={loaded.dtype}"
    )
    versions = taker["versions"]
    print(
        f"taker {versions['taker']} (torch {versions['torch']}, transformers {versions['transformers']}) "  # type: ignore[index]
        f"batch_size=1 device={taker['device']} dtype={taker['dtype']}: {taker['tokens']} tokens, "
        f"{taker['texts']} texts, {taker['seconds']:.1f} s (cpu {taker['cpu_s']:.1f} s), "
        f"{taker_tok_s:.1f} tokens/s (forward passes {taker['forward_s']:.1f} s of it)"
    )
    for name, row in rows.items():
        print(
            f"{name} batch_size={row['batch_size']} fields={','.join(row['fields'])}: "  # type: ignore[arg-type]
            f"{row['tokens']} tokens, {row['texts']} texts, {row['seconds']:.2f} s (cpu {row['cpu_s']:.1f} s), "
            f"{row['tok_s']:.1f} tokens/s (median of {args.repeats})"
        )
    print(
        f"check: mean|x| selprune_b1 vs taker, max relative difference ff={check['ff']:.2e} "
        f"attn={check['attn']:.2e}"
    )
    ratio_b1 = float(rows["selprune_b1"]["tok_s"]) / taker_tok_s  # type: ignore[arg-type]
    ratio = float(rows[f"selprune_b{default_batch}"]["tok_s"]) / taker_tok_s  # type: ignore[arg-type]
    if args.json:
        taker_row = {k: v for k, v in taker.items() if k not in ("ff_abs", "attn_abs")}
        figures = {
            "tokens": args.tokens,
            "token_limit": args.token_limit,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype),
            "taker": {**taker_row, "batch_size": 1, "tok_s": taker_tok_s},
            "selprune": rows,
            "check_max_rel_diff": check,
            "vs_taker_batch1": ratio_b1,
            "vs_taker": ratio,
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    # Tokens per CPU second: steadier than wall time where other processes share the cores.
    cpu_rate = {name: float(row["tokens"]) / float(row["cpu_s"]) for name, row in rows.items()}  # type: ignore[arg-type]
    taker_cpu_rate = float(taker["tokens"]) / float(taker["cpu_s"])  # type: ignore[arg-type]
    print(
        f"per CPU second: vs_taker_batch1={cpu_rate['selprune_b1'] / taker_cpu_rate:.1f} "
        f"vs_taker={cpu_rate[f'selprune_b{default_batch}'] / taker_cpu_rate:.1f}"
    )
    print(f"vs_taker_batch1={ratio_b1:.1f}")
    print(f"vs_taker={ratio:.1f}")


if __name__ == "__main__":
    main()
