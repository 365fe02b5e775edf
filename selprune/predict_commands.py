"""`selprune classify IMAGE...` and `selprune fill-mask TEXT...`: one-shot predictions through the
gateway's POST /v1/classify and /v1/fill-mask, with a mask applied when --mask is given.

Predictions go to stdout, one block per input (or the gateway's whole response with --json); timings
go to stderr, as `selprune generate` does. Errors propagate to `cli.main`.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from selprune.cli_args import EXIT_USAGE, CliError
from selprune.client import SelpruneClient
from selprune.console import out
from selprune.settings import CliSettings


def _common(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--mask", dest="mask_id", metavar="MASK_ID", help=f"{what} through this mask")
    p.add_argument("--model", help="default: the mask's model, else the built-in one")
    p.add_argument("--top-k", type=int, metavar="K", help="answers per input (default 5)")
    p.add_argument("--json", action="store_true", help="print the gateway's whole response as JSON")


def add_classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or .npy files")
    _common(p, "classify")


def add_fill_mask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="TEXT", help='text holding "<mask>" at least once')
    _common(p, "fill")


def _body(args: argparse.Namespace, **fields: Any) -> dict[str, Any]:
    fields.update(mask_id=args.mask_id, model=args.model, top_k=args.top_k)
    return {k: v for k, v in fields.items() if v is not None}


def encode_images(paths: list[str]) -> list[str]:
    """Each file's bytes as base64, in order; a file that cannot be read is a usage error naming it."""
    encoded = []
    for name in paths:
        try:
            encoded.append(base64.b64encode(Path(name).read_bytes()).decode("ascii"))
        except OSError as exc:
            raise CliError(f"cannot read image {name!r}: {exc.strerror or exc}", EXIT_USAGE) from exc
    return encoded


def classify_lines(names: list[str], response: dict[str, Any]) -> list[str]:
    """`NAME: label (p), label (p), ...` per image, most probable first."""
    lines = []
    for name, prediction in zip(names, response.get("predictions", []), strict=False):
        labels = ", ".join(f"{x['label']} ({x['probability']:.3f})" for x in prediction.get("labels", []))
        lines.append(f"{name}: {labels}")
    return lines


def fill_mask_lines(response: dict[str, Any]) -> list[str]:
    """Per input, its filled text, then per mask position the candidate tokens with probabilities."""
    lines = []
    for result in response.get("results", []):
        lines.append(str(result.get("filled", "")))
        for fill in result.get("masks", []):
            tokens = ", ".join(f"{x['token']!r} ({x['probability']:.3f})" for x in fill.get("tokens", []))
            lines.append(f"  token {fill.get('position')}: {tokens}")
    return lines


def summary(response: dict[str, Any], rows: int) -> str:
    """One line for stderr: the model, the mask and where the time went."""
    timings = response.get("timings") or {}
    parts = [
        f"model {response.get('model')}",
        f"mask {response.get('mask_id') or '(none)'}",
        f"{rows} input(s); queue {timings.get('queue_ms', 0):.0f} ms, model {timings.get('model_ms', 0):.0f} ms "
        f"(batch of {timings.get('batch_rows', 0)} row(s))",
    ]
    return "; ".join(parts)


def _print(args: argparse.Namespace, response: dict[str, Any], lines: list[str], rows: int) -> int:
    if args.json:
        out(json.dumps(response, indent=2))
    else:
        out(*lines)
    sys.stderr.write(summary(response, rows) + "\n")
    return 0


def cmd_classify(args: argparse.Namespace, settings: CliSettings) -> int:
    body = _body(args, images=encode_images(args.images))
    with SelpruneClient(args.url or settings.url, args.api_key or settings.api_key) as client:
        response = client.classify(body)
    return _print(args, response, classify_lines(args.images, response), len(args.images))


def cmd_fill_mask(args: argparse.Namespace, settings: CliSettings) -> int:
    body = _body(args, inputs=args.inputs)
    with SelpruneClient(args.url or settings.url, args.api_key or settings.api_key) as client:
        response = client.fill_mask(body)
    return _print(args, response, fill_mask_lines(response), len(args.inputs))
