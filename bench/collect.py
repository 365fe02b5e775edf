"""Cost of activation collection: tokens/s with collection hooks vs plain forward passes.

Runs the embedded model over the same batches, alternating plain and collecting passes in rounds so
machine noise hits all alike. Collection runs the decoder body only and stops after the last hooked
site, so it can beat a full forward; the body forward (no LM head) is its limit. Prints, last:

    collect_vs_body=<tokens/s with collection / tokens/s of the body forward, no LM head>
    collect_vs_forward=<tokens/s with collection / tokens/s of the full forward, logits included>

Usage: python bench/collect.py [--device cpu|cuda] [--dtype float32] [--batches 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from selprune_core.activations import STAT_FIELDS, collect_activations
from selprune_core.batching import iter_token_batches
from selprune_core.corpora import load_builtin
from selprune_core.loading import EMBEDDED_MODEL, load_model
from selprune_core.partial_forward import decoder_body
from selprune_core.scoring import required_fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--token-limit", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cache-dir", default=os.environ.get("SELPRUNE_CACHE_DIR", str(Path.home() / ".cache/selprune"))
    )
    args = parser.parse_args()

    loaded = load_model(EMBEDDED_MODEL, cache_dir=Path(args.cache_dir), device=args.device, dtype=args.dtype)
    model, sites = loaded.model, loaded.sites
    texts = load_builtin(
        "python_code", Path(args.cache_dir), max_texts=args.batches * args.batch_size * 2
    ).train
    batches = list(
        iter_token_batches(
            loaded.tokenizer,
            texts,
            token_limit=args.token_limit,
            batch_size=args.batch_size,
            device=loaded.device,
        )
    )[: args.batches]
    n_tokens = sum(b.n_tokens for b in batches)
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)

    body = decoder_body(model)

    @torch.no_grad()
    def plain() -> None:
        for batch in batches:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    @torch.no_grad()
    def plain_body() -> None:
        for batch in batches:
            body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    def collect(which: tuple[str, ...]) -> None:
        collect_activations(model, sites, batches, sample_tokens=10**12, which=which)

    default_fields = required_fields("abs", "abs")  # what the default job collects
    variants = {
        "forward": plain,
        "body": plain_body,
        "collect_all": lambda: collect(STAT_FIELDS),
        "collect": lambda: collect(default_fields),
    }
    plain()  # warm-up
    seconds = dict.fromkeys(variants, 0.0)
    for _ in range(args.rounds):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            seconds[name] += time.perf_counter() - start
    rate = {name: n_tokens * args.rounds / s for name, s in seconds.items()}
    print(f"device={loaded.device} dtype={loaded.dtype} tokens_per_pass={n_tokens} rounds={args.rounds}")
    for name, value in rate.items():
        print(f"{name}: {value:.0f} tokens/s")
    print(f"collect_all_vs_forward={rate['collect_all'] / rate['forward']:.3f} (all five running sums)")
    print(f"body_vs_forward={rate['body'] / rate['forward']:.3f} (the limit for collection)")
    print(f"collect_vs_body={rate['collect'] / rate['body']:.3f}")
    print(f"collect_vs_forward={rate['collect'] / rate['forward']:.3f}")


if __name__ == "__main__":
    main()
