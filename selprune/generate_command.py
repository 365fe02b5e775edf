"""`selprune generate PROMPT [--mask ID] ...`: generation through the gateway's POST /v1/generate.

The text streams to stdout as it is produced (whole, with --no-stream); token counts and timings go to
stderr, so `selprune generate ... > out.txt` keeps only the text. Errors propagate to `cli.main`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from selprune.client import SelpruneClient
from selprune.settings import CliSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="raw text to continue")
    p.add_argument("--mask", dest="mask_id", metavar="MASK_ID", help="generate through this mask")
    p.add_argument("--model", help="default: the mask's model, else the embedded model")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="(default 64)")
    p.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling (default 1 = off)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest (default 0 = off)")
    p.add_argument("--seed", type=int, metavar="S", help="fixes sampling: the same seed gives the same text")
    p.add_argument("--stop", action="append", metavar="STR", help="stop before STR (repeatable, up to 4)")
    p.add_argument("--no-stream", action="store_true", help="print the text once it is complete")


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    fields = {
        "prompt": args.prompt,
        "mask_id": args.mask_id,
        "model": args.model,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
    }
    return {k: v for k, v in fields.items() if v is not None}


def summary(response: dict[str, Any]) -> str:
    """One line for stderr: why it ended, tokens, where the time went, and the seed to reproduce it."""
    usage, timings = response.get("usage") or {}, response.get("timings") or {}
    parts = [
        f"finish: {response.get('finish_reason')}",
        f"{usage.get('prompt_tokens', 0)} prompt + {usage.get('completion_tokens', 0)} completion tokens",
        f"queue {timings.get('queue_ms', 0):.0f} ms, model {timings.get('model_ms', 0):.0f} ms "
        f"(batch of {timings.get('batch_rows', 0)} row(s))",
    ]
    if response.get("seed") is not None:
        parts.append(f"seed {response['seed']}")
    if response.get("mask_id"):
        parts.append(f"mask {response['mask_id']}")
    return "; ".join(parts)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args: argparse.Namespace, settings: CliSettings) -> int:
    body = request_body(args)
    with SelpruneClient(args.url or settings.url, args.api_key or settings.api_key) as client:
        if args.no_stream:
            response = client.generate(body)
            _write(str(response.get("text", "")))
        else:
            response = client.generate(body, on_text=_write)
    _write("\n")
    sys.stderr.write(summary(response) + "\n")
    return 0


DEMO_PROMPT = "def fibonacci(n):"
# What the demo shows through its new mask: the forgotten skill (code) and a kept one (prose).
DEMO_PROMPTS = (DEMO_PROMPT, "The history of the printing press")


def before_after(client: SelpruneClient, mask_id: str, prompt: str = DEMO_PROMPT, tokens: int = 40) -> str:
    """The same greedy continuation of `prompt` from the base model and through `mask_id`, side by side:
    what `selprune demo` shows once its mask exists (both requests share one served model)."""
    model = client.mask(mask_id).get("model")
    body = {
        "prompt": prompt,
        "max_new_tokens": tokens,
        "temperature": 0,
        **({"model": model} if model else {}),
    }
    base = client.generate(body)
    masked = client.generate({**body, "mask_id": mask_id})
    return "\n".join(
        [
            f"prompt: {prompt!r} (greedy, {tokens} tokens)",
            f"  base model:   {str(base.get('text', ''))!r}",
            f"  through mask: {str(masked.get('text', ''))!r}",
        ]
    )
