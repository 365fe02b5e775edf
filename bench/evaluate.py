"""Cost of evaluation: tokens/s of a job's evaluation step vs a plain forward over the same tokens.

Evaluates the embedded model on the held-out texts of the default job's sets (python_code and
english_prose) with the default job's settings (token_limit 512, 5,000 skip predictions per set,
batch 8, 1,000 bootstrap resamples), through `evaluate_sets` as a step calls it: choosing and
tokenizing the texts, the forward passes, scoring every prediction and the confidence intervals.
The baseline is the full forward (logits included) over the same number of tokens, packed into rows
of token_limit tokens with no padding, batch 8. The two alternate round by round so machine noise
hits both alike. The last line is

    eval_vs_forward=<evaluation tokens/s / forward tokens/s>

`--cached-plan` also times evaluation with the texts planned once, as a pruning run does.

Usage: python bench/evaluate.py [--device auto] [--dtype float32] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from selprune_core.config import EvalConfig
from selprune_core.corpora import load_builtin
from selprune_core.evaluation import common_target_ids, evaluate_sets, plan_sets
from selprune_core.loading import EMBEDDED_MODEL, load_model

SETS = ("python_code", "english_prose")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--token-limit", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--cache-dir", default=os.environ.get("SELPRUNE_CACHE_DIR", str(Path.home() / ".cache/selprune"))
    )
    args = parser.parse_args()

    cache = Path(args.cache_dir)
    loaded = load_model(EMBEDDED_MODEL, cache_dir=cache, device=args.device, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    sets = {name: load_builtin(name, cache, max_texts=2_000).heldout for name in SETS}
    cfg = EvalConfig(token_limit=args.token_limit, sample_tokens=args.eval_tokens, batch_size=args.batch_size)
    union = [text for texts in sets.values() for text in texts]
    common = common_target_ids(tokenizer, union, n=cfg.skip_common, token_limit=cfg.token_limit)
    plans = plan_sets(tokenizer, sets, cfg, common_ids=common)
    # Every token of every scored text, padding excluded: what the evaluation reads.
    n_tokens = sum(int(b.attention_mask.sum()) for plan in plans.values() for b in plan.batches)

    # The same number of tokens for the forward, as full rows of the scored texts' tokens.
    stream = [
        int(t) for plan in plans.values() for b in plan.batches for t in b.input_ids[b.attention_mask.bool()]
    ]
    width = args.token_limit
    rows = torch.tensor(stream[: len(stream) // width * width]).view(-1, width)  # [row, token_limit]
    forward_tokens = rows.numel()
    device = loaded.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.no_grad()
    def forward() -> None:
        for start in range(0, rows.shape[0], args.batch_size):
            ids = rows[start : start + args.batch_size].to(device)
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

    variants = {
        "forward": (forward, forward_tokens),
        "evaluate": (lambda: evaluate_sets(model, tokenizer, sets, cfg, common_ids=common), n_tokens),
        "evaluate_cached_plan": (
            lambda: evaluate_sets(model, tokenizer, sets, cfg, common_ids=common, plans=plans),
            n_tokens,
        ),
    }
    forward()  # warm-up
    seconds = dict.fromkeys(variants, 0.0)
    for _ in range(args.rounds):
        for name, (fn, _) in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            seconds[name] += time.perf_counter() - start
    rate = {name: tokens * args.rounds / seconds[name] for name, (_, tokens) in variants.items()}
    figures = {
        "eval_vs_forward": rate["evaluate"] / rate["forward"],
        "eval_cached_plan_vs_forward": rate["evaluate_cached_plan"] / rate["forward"],
    }
    texts = sum(plan.n_texts for plan in plans.values())
    print(
        f"device={device} dtype={loaded.dtype} threads={torch.get_num_threads()} rounds={args.rounds} "
        f"texts={texts} eval_tokens={n_tokens} forward_tokens={forward_tokens}"
    )
    for name, value in rate.items():
        print(f"{name}: {value:.0f} tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens_per_s": rate, **figures}, indent=2))
    print(f"eval_cached_plan_vs_forward={figures['eval_cached_plan_vs_forward']:.3f}")
    print(f"eval_vs_forward={figures['eval_vs_forward']:.3f}")


if __name__ == "__main__":
    main()
