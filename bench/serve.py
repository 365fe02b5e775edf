"""Serving benchmarks: what masks cost a generation server, measured through the worker's own code.

Throughput figures run batches through `ServeEngine` (what the serving loop calls: an admission, which
tokenizes and prefills, then one decoding step at a time). The two compared variants run side by side,
each on its own engine, interleaved unit by unit (admission or step) with each unit timed on its own,
so machine noise hits both alike within a fraction of a second instead of a whole pass apart
(`--interleave pass` alternates whole passes instead). Each round runs both variants once, the other
one first every other round; a ratio is the median of the per-round ratios (printed per figure).
Each comparison first runs one untimed round at full length. Tokens/s counts generated tokens over
the time spent in the variant's own units, from prompt text in to completion text out; rows ignore
EOS, so every row makes the same number of tokens whatever its mask does to the text.

    masked_vs_unmasked   8 requests through one mask / the same 8 unmasked (target >= 0.97)
    serve_vs_hf_generate the same 8 prompts unmasked and greedy through the engine / through transformers'
                         `model.generate` as one left-padded batch (same model object, so same device and
                         dtype; greedy, KV cache, exactly --new-tokens per row via min_new_tokens; its
                         time includes tokenizing and detokenizing, as the engine's does) (target >= 1.0)
    mixed_vs_single      8 requests on 8 distinct masks / 8 on one mask (target >= 0.9)
    mixed_vs_sequential  the mixed batch / the same 8 requests served one at a time (target >= 3)
    overhead_ms_p50/p99  client latency of POST /v1/generate through a real local stack (gateway,
                         Redis, worker processes, as `selprune up` runs them) minus the worker's
                         reported time in the model
    rss_100_vs_1         this process's resident memory with 100 masks in the serving table / with 1
                         (target <= 1.05); on CUDA also the device memory ratio

The last line holds every figure as name=value pairs.

Usage: python bench/serve.py [--device auto] [--dtype float32] [--new-tokens 24] [--rounds 6]
       [--threads N] [--interleave step|pass] [--requests 40] [--no-stack]
       [--only throughput,generate,memory,stack]

On a CPU the ratios are only as steady as the machine: other processes on the same cores can move a
round by 10-30%. Step interleaving pairs most of that noise; `--threads 1` (both variants alike) is
steadier still on a shared machine, and more `--rounds` narrow the median.
"""

# ruff: noqa: E402  (torch may only be imported after apply_process_defaults)
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import uuid
from collections.abc import Callable, Generator
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

# One pass of a variant, run a unit of work per `next` (an admission, a decoding step, or a whole
# model.generate); it returns the number of tokens it generated.
Pass = Generator[None, None, int]
Variant = Callable[[], Pass]  # a fresh pass of the same work each call


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
        self.hf_texts: list[str] = []  # the completions of the last hf_generate, in prompt order

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

    def units(self, engine: ServeEngine, batches: list[list[GenerateTask]]) -> Pass:
        """Serve the batches in turn on `engine` as `ServeEngine.run` does, one unit per `next`: an
        admission, then each decoding step. Returns the tokens generated."""
        done: list[GenerateDone] = []

        def reply(events: list[tuple[GenerateTask, Event]]) -> None:
            for _task, event in events:
                if isinstance(event, GenerateDone):
                    done.append(event)
                elif event.kind == "error":
                    raise RuntimeError(event.error.message)

        for batch in batches:
            engine.admit(batch, reply)
            yield
            while engine.rows:
                engine.step(reply)
                yield
        return sum(d.usage.completion_tokens for d in done)

    def timed(self, *passes: Pass) -> list[tuple[float, int, float]]:
        """Run the passes interleaved unit by unit, in turn in the order given, each unit timed on its
        own; returns each pass's (seconds in its own units, tokens generated, CPU seconds of this
        process in its units)."""
        seconds, cpu = [0.0] * len(passes), [0.0] * len(passes)
        tokens: list[int | None] = [None] * len(passes)
        while any(t is None for t in tokens):
            for i, unit in enumerate(passes):
                if tokens[i] is not None:
                    continue
                self.sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                try:
                    next(unit)
                except StopIteration as stop:
                    tokens[i] = stop.value
                self.sync()
                seconds[i] += time.perf_counter() - start
                cpu[i] += time.process_time() - start_cpu
        return [(s, t or 0, c) for s, t, c in zip(seconds, tokens, cpu, strict=True)]

    def serve(self, batches: list[list[GenerateTask]]) -> tuple[float, int]:
        """Run the batches in turn on the bench's engine; returns (seconds, tokens generated)."""
        seconds, tokens, _ = self.timed(self.units(self.engine, batches))[0]
        return seconds, tokens

    def served(self, batches: list[list[GenerateTask]]) -> Variant:
        """The batches as a variant with an engine of its own (compared variants run side by side)."""
        engine = self.new_engine()
        return lambda: self.units(engine, batches)

    def generated(self, new_tokens: int) -> Variant:
        """`hf_generate` as a variant: the whole generate is one unit."""

        def one_unit() -> Pass:
            yield from ()
            return self.hf_generate(new_tokens)

        return one_unit

    def hf_generate(self, new_tokens: int) -> int:
        """The bench's prompts as one batch through transformers' `model.generate`, the way a plain HF
        server would run them: left-padded with the tokenizer's pad token, greedy, KV cache, exactly
        `new_tokens` per row (min_new_tokens keeps EOS from ending a row early, as the engine's
        ignore_eos does), from text in to text out. Returns the tokens generated."""
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        enc = tokenizer(self.prompts, padding=True, padding_side="left", return_tensors="pt")
        enc = enc.to(self.loaded.device)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                use_cache=True,
                pad_token_id=pad,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        self.hf_texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        return int(new.numel())

    def pair(self, first: Variant, second: Variant) -> list[tuple[float, int, float]]:
        """One pass of each, interleaved by unit (or pass after pass with --interleave pass)."""
        if self.args.interleave == "step":
            return self.timed(first(), second())
        return [*self.timed(first()), *self.timed(second())]

    def ratio(self, name: str, a: Variant, b: Variant) -> float:
        """Median over rounds of (tokens/s of a) / (tokens/s of b). One untimed round first (full
        length: allocator and caches see the real shapes); a goes first in even rounds and b in odd
        ones, so an order effect hits both sides alike.

        On a CPU it also prints the same ratio by CPU time (not a figure): other processes on the
        machine stretch wall time (descheduling) more than the CPU time this process spends (they
        still share its caches and memory bandwidth), so a round far off in wall time but not in CPU
        time was machine noise. It only compares like with like where both variants run the same
        shapes (not mixed_vs_sequential: batch-1 steps keep torch's threads less busy, so they cost
        less CPU time per second of wall time)."""
        self.pair(a, b)
        ratios, cpu_ratios = [], []
        for i in range(self.args.rounds):
            if i % 2 == 0:
                (sa, ta, ca), (sb, tb, cb) = self.pair(a, b)
            else:
                (sb, tb, cb), (sa, ta, ca) = self.pair(b, a)
            ratios.append((ta / sa) / (tb / sb))
            cpu_ratios.append((ta / ca) / (tb / cb))
        line = f"{name}: rounds " + " ".join(f"{r:.3f}" for r in ratios)
        if self.loaded.device.type == "cpu":
            line += f" | by CPU time: median {statistics.median(cpu_ratios):.3f}, rounds " + " ".join(
                f"{r:.3f}" for r in cpu_ratios
            )
        print(line)
        return statistics.median(ratios)


def throughput(bench: Bench, figures: dict[str, float]) -> None:
    n, tokens = bench.args.batch, bench.args.new_tokens
    one = bench.new_mask(0)
    distinct = [bench.new_mask(seed) for seed in range(1, n + 1)]
    bench.serve([bench.tasks([one] * n, 2)])  # warm-up: load the masks, first-call costs
    bench.serve([bench.tasks(list(distinct), 2)])
    unmasked = bench.served([bench.tasks([None] * n, tokens)])
    masked = bench.served([bench.tasks([one] * n, tokens)])
    mixed = bench.served([bench.tasks(list(distinct), tokens)])
    sequential = bench.served([[task] for task in bench.tasks(list(distinct), tokens)])
    figures["masked_vs_unmasked"] = bench.ratio("masked_vs_unmasked", masked, unmasked)
    figures["mixed_vs_single"] = bench.ratio("mixed_vs_single", mixed, masked)
    figures["mixed_vs_sequential"] = bench.ratio("mixed_vs_sequential", mixed, sequential)


def versus_generate(bench: Bench, figures: dict[str, float]) -> None:
    """The engine against transformers' own batched greedy decoding on the same prompts and model."""
    n, tokens = len(bench.prompts), bench.args.new_tokens
    texts: dict[str, str] = {}  # request id -> the engine's completion

    def reply(events: list[tuple[GenerateTask, Event]]) -> None:
        texts.update((t.request_id, e.choices[0].text) for t, e in events if isinstance(e, GenerateDone))

    tasks = bench.tasks([None] * n, tokens)  # task i holds prompt i
    bench.engine.run(tasks, reply)  # a check, untimed
    bench.hf_generate(tokens)
    same = sum(texts.get(t.request_id) == hf for t, hf in zip(tasks, bench.hf_texts, strict=True))
    # Different texts would mean the two sides do different work (or min_new_tokens moved a row off EOS).
    print(f"serve_vs_hf_generate: {same}/{n} rows give the engine's text")
    figures["serve_vs_hf_generate"] = bench.ratio(
        "serve_vs_hf_generate",
        bench.served([bench.tasks([None] * n, tokens)]),
        bench.generated(tokens),
    )


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


GROUPS = ("throughput", "generate", "memory", "stack")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per figure (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--interleave",
        choices=("step", "pass"),
        default="step",
        help="how compared variants alternate: unit by unit (default) or whole pass after whole pass",
    )
    parser.add_argument("--requests", type=int, default=40, help="requests timed through the stack")
    parser.add_argument("--no-stack", action="store_true", help="skip the gateway overhead figures")
    parser.add_argument(
        "--only",
        default=",".join(GROUPS),
        help="comma-separated figure groups to run: throughput (masked_vs_unmasked, mixed_*), generate "
        "(serve_vs_hf_generate), memory (rss_*), stack (overhead_ms_*) (default: all)",
    )
    parser.add_argument(
        "--cache-dir", default=os.environ.get("SELPRUNE_CACHE_DIR", str(Path.home() / ".cache/selprune"))
    )
    args = parser.parse_args()
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    if unknown := groups - set(GROUPS):
        parser.error(f"--only: unknown groups {', '.join(sorted(unknown))} (choose from {', '.join(GROUPS)})")
    if args.no_stack:
        groups.discard("stack")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    figures: dict[str, float] = {}
    if groups - {"stack"}:
        bench = Bench(args)
        print(
            f"model={EMBEDDED_MODEL} device={bench.loaded.device} dtype={bench.loaded.dtype} "
            f"batch={args.batch} new_tokens={args.new_tokens} rounds={args.rounds} "
            f"threads={torch.get_num_threads()} interleave={args.interleave}"
        )
        if "throughput" in groups:
            throughput(bench, figures)
        if "generate" in groups:
            versus_generate(bench, figures)
        if "memory" in groups:
            memory(bench, figures)
        del bench
        gc.collect()
    if "stack" in groups:
        overhead(args, figures)
    print(" ".join(f"{name}={value:.3f}" for name, value in figures.items()))


if __name__ == "__main__":
    main()
