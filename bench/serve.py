"""Serving benchmarks: what masks cost a generation server, measured through the worker's own code.

Throughput figures run batches through `ServeEngine` (what the serving loop calls), alternating the
compared variants round by round so machine noise hits both alike; a ratio is the median of the
per-round ratios. Tokens/s counts generated tokens over time in the model; rows ignore EOS, so every
row makes the same number of tokens whatever its mask does to the text.

    masked_vs_unmasked   8 requests through one mask / the same 8 unmasked (target >= 0.97)
    mixed_vs_single      8 requests on 8 distinct masks / 8 on one mask (target >= 0.9)
    mixed_vs_sequential  the mixed batch / the same 8 requests served one at a time (target >= 3)
    overhead_ms_p50/p99  client latency of POST /v1/generate through a real local stack (gateway,
                         Redis, worker processes, as `selprune up` runs them) minus the worker's
                         reported time in the model
    rss_100_vs_1         this process's resident memory with 100 masks in the serving table / with 1
                         (target <= 1.05); on CUDA also the device memory ratio

The last line holds every figure as name=value pairs.

Usage: python bench/serve.py [--device auto] [--dtype float32] [--new-tokens 24] [--rounds 3]
       [--requests 40] [--no-stack]
"""

# ruff: noqa: E402  (torch may only be imported after apply_process_defaults)
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import uuid
from pathlib import Path

from worker.settings import apply_process_defaults

apply_process_defaults()  # the worker's OpenMP settings, before torch is imported

import httpx
import torch

from protocol import GenerateDone, GenerateTask, SamplingParams
from selprune.local_stack import LocalStack, StackConfig, free_port
from selprune_core.corpora import load_builtin
from selprune_core.loading import EMBEDDED_MODEL
from selprune_core.masks import NeuronMask
from worker.runtime import ModelRuntime
from worker.serve_engine import Event, ServeEngine


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        cache_dir = Path(args.cache_dir)
        self.runtime = ModelRuntime(
            cache_dir=cache_dir, data_root=Path("."), device=args.device, dtype=args.dtype
        )
        self.loaded = self.runtime.model(EMBEDDED_MODEL)
        self.masks: dict[str, bytes] = {}
        self.engine = self.new_engine()
        # Held-out code continuations: long enough that rows rarely stop early on EOS.
        texts = load_builtin("python_code", cache_dir, max_texts=200).heldout
        self.prompts = [t[:200] for t in texts[: args.batch]]
        self.sync = torch.cuda.synchronize if self.loaded.device.type == "cuda" else (lambda: None)

    def new_engine(self) -> ServeEngine:
        return ServeEngine(self.runtime, self._load_mask, mask_slots=256, max_prompt_tokens=4096)

    def _load_mask(self, mask_id: str, _tenant: str) -> bytes:
        return self.masks[mask_id]

    def new_mask(self, seed: int, frac: float = 0.1) -> str:
        """A random mask pruning `frac` of every layer's neurons, registered for the engine to fetch."""
        sites, g = self.loaded.sites, torch.Generator().manual_seed(seed)
        ff = torch.rand(sites.n_layers, sites.d_mlp, generator=g) >= frac
        attn = torch.rand(sites.n_layers, sites.d_attn, generator=g) >= frac
        mask = NeuronMask(self.loaded.fingerprint, ff, attn, sites.n_heads)
        self.masks[mask.mask_id] = mask.to_bytes()
        return mask.mask_id

    def tasks(self, mask_ids: list[str | None], new_tokens: int) -> list[GenerateTask]:
        now = time.time()
        return [
            GenerateTask(
                request_id=uuid.uuid4().hex,
                tenant="bench",
                model=EMBEDDED_MODEL,
                mask_id=mask_id,
                prompts=[self.prompts[i % len(self.prompts)]],
                sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                enqueued_at=now,
                deadline=now + 3600,
            )
            for i, mask_id in enumerate(mask_ids)
        ]

    def serve(self, batches: list[list[GenerateTask]]) -> tuple[float, int]:
        """Run the batches in turn; returns (seconds in the model, tokens generated)."""
        done: list[GenerateDone] = []

        def reply(events: list[tuple[GenerateTask, Event]]) -> None:
            for _task, event in events:
                if isinstance(event, GenerateDone):
                    done.append(event)
                elif event.kind == "error":
                    raise RuntimeError(event.error.message)

        self.sync()
        start = time.perf_counter()
        for batch in batches:
            self.engine.run(batch, reply)
        self.sync()
        seconds = time.perf_counter() - start
        return seconds, sum(d.usage.completion_tokens for d in done)

    def ratio(self, a: list[list[GenerateTask]], b: list[list[GenerateTask]]) -> float:
        """Median over rounds of (tokens/s of a) / (tokens/s of b), a and b alternating."""
        ratios = []
        for _ in range(self.args.rounds):
            sa, ta = self.serve(a)
            sb, tb = self.serve(b)
            ratios.append((ta / sa) / (tb / sb))
        return statistics.median(ratios)


def throughput(bench: Bench, figures: dict[str, float]) -> None:
    n, tokens = bench.args.batch, bench.args.new_tokens
    one = bench.new_mask(0)
    distinct = [bench.new_mask(seed) for seed in range(1, n + 1)]
    bench.serve([bench.tasks([one] * n, 2)])  # warm-up: load the masks, first-call costs
    bench.serve([bench.tasks(list(distinct), 2)])
    unmasked = [bench.tasks([None] * n, tokens)]
    masked = [bench.tasks([one] * n, tokens)]
    mixed = [bench.tasks(list(distinct), tokens)]
    sequential = [[task] for task in bench.tasks(list(distinct), tokens)]
    figures["masked_vs_unmasked"] = bench.ratio(masked, unmasked)
    figures["mixed_vs_single"] = bench.ratio(mixed, masked)
    figures["mixed_vs_sequential"] = bench.ratio(mixed, sequential)


def memory(bench: Bench, figures: dict[str, float]) -> None:
    """Resident memory with 1 mask in the table, then with 100 (each used in a batch)."""
    bench.engine = bench.new_engine()  # an empty table
    gc.collect()
    ids = [bench.new_mask(1000 + i) for i in range(100)]
    n = bench.args.batch
    cuda = bench.loaded.device.type == "cuda"
    bench.serve([bench.tasks([ids[0]] * n, 2)])
    gc.collect()
    rss_one, dev_one = rss_bytes(), torch.cuda.memory_allocated() if cuda else 0
    bench.serve([bench.tasks(ids[i : i + n], 2) for i in range(0, len(ids), n)])
    gc.collect()
    rss_all, dev_all = rss_bytes(), torch.cuda.memory_allocated() if cuda else 0
    table = bench.engine.table(EMBEDDED_MODEL, bench.loaded)
    print(f"mask table: {len(table)} masks, {table.nbytes / 1e6:.1f} MB on {bench.loaded.device}")
    print(f"rss: {rss_one / 1e6:.0f} MB with 1 mask, {rss_all / 1e6:.0f} MB with 100")
    figures["rss_100_vs_1"] = rss_all / rss_one
    if cuda:
        figures["cuda_mem_100_vs_1"] = dev_all / dev_one


def overhead(args: argparse.Namespace, figures: dict[str, float]) -> None:
    """Latency through a real local stack minus the worker's time in the model, per request."""
    port = free_port()
    env = {"SELPRUNE_DEVICE": args.device, "SELPRUNE_DTYPE": args.dtype, "SELPRUNE_LOG_LEVEL": "WARNING"}
    cfg = StackConfig(port=port, cache_dir=Path(args.cache_dir), env=env, ready_timeout=600)
    samples: list[float] = []
    with LocalStack(cfg) as stack, httpx.Client(base_url=stack.url, timeout=120) as http:
        stack.start()
        body = {"prompt": "def add(a, b):", "max_new_tokens": 4}
        for i in range(args.requests + 3):
            start = time.perf_counter()
            response = http.post("/v1/generate", json=body)
            wall_ms = 1000 * (time.perf_counter() - start)
            response.raise_for_status()
            if i >= 3:  # the first requests pay for warm-up
                samples.append(wall_ms - response.json()["timings"]["model_ms"])
    samples.sort()
    figures["overhead_ms_p50"] = statistics.median(samples)
    figures["overhead_ms_p99"] = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=40, help="requests timed through the stack")
    parser.add_argument("--no-stack", action="store_true", help="skip the gateway overhead figures")
    parser.add_argument(
        "--cache-dir", default=os.environ.get("SELPRUNE_CACHE_DIR", str(Path.home() / ".cache/selprune"))
    )
    args = parser.parse_args()
    figures: dict[str, float] = {}
    bench = Bench(args)
    print(
        f"model={EMBEDDED_MODEL} device={bench.loaded.device} dtype={bench.loaded.dtype} batch={args.batch} "
        f"new_tokens={args.new_tokens} rounds={args.rounds}"
    )
    throughput(bench, figures)
    memory(bench, figures)
    if not args.no_stack:
        del bench
        gc.collect()
        overhead(args, figures)
    print(" ".join(f"{name}={value:.3f}" for name, value in figures.items()))


if __name__ == "__main__":
    main()
