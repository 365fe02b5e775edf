"""The client side of unlearning jobs on a gateway: `selprune submit`, `status` and `wait`.

Each talks to the gateway at --url / SELPRUNE_URL with --api-key / SELPRUNE_API_KEY. `follow_job`, which
shows a job's progress to its end and says by its exit code how it ended, is shared with `selprune demo`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from selprune.cli_args import (
    DEFAULT_FORGET,
    DEFAULT_RETAIN,
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    dataset_spec,
    params_from_args,
)
from selprune.client import SelpruneClient
from selprune.console import err, follow_events, format_step_line, out, phase_label, render_table
from selprune.settings import CliSettings


def _client(args: argparse.Namespace, settings: CliSettings) -> SelpruneClient:
    return SelpruneClient(args.url or settings.url, args.api_key or settings.api_key)


def follow_job(client: SelpruneClient, job_id: str) -> int:
    """Follow a job's events to its end, print the table; the exit code says how it ended."""
    follow_events(client.events(job_id))
    status = client.job(job_id)
    return _report(status)


def _report(status: dict[str, Any]) -> int:
    state = str(status.get("state"))
    steps = status.get("metrics") or []
    if steps:
        out("", render_table(steps))
    if state == "succeeded":
        if status.get("mask_id"):
            out("", f"mask {status['mask_id']}")
        return EXIT_OK
    error = status.get("error") or {}
    detail = f": {error.get('type', 'Error')}: {error.get('message', '')}" if error else ""
    err(f"job {status.get('job_id', '')} {state}{detail}")
    return EXIT_CANCELLED if state == "cancelled" else EXIT_ERROR


def cmd_submit(args: argparse.Namespace, settings: CliSettings) -> int:
    body: dict[str, Any] = {"model": args.model, "forget": args.forget, "retain": args.retain}
    if args.preset:  # the preset's datasets, unless --forget / --retain name others
        body["preset"] = args.preset
        for key, default in (("forget", DEFAULT_FORGET), ("retain", DEFAULT_RETAIN)):
            if body[key] == dataset_spec(default):
                del body[key]
    if args.name:
        body["name"] = args.name
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key
    params = params_from_args(args)
    if params:
        body["params"] = params
    with _client(args, settings) as client:
        out(client.submit_unlearn(body))
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: CliSettings) -> int:
    with _client(args, settings) as client:
        status = client.job(args.job_id)
    if args.json:
        out(json.dumps(status, indent=2))
        return EXIT_OK
    name = f" ({status['name']})" if status.get("name") else ""
    lines = [f"job {status.get('job_id', args.job_id)}{name}: {status.get('state')}"]
    if status.get("state") == "running":
        tokens = status.get("tokens") or 0
        lines.append(
            f"phase: {phase_label(str(status.get('phase', '')))}, step {status.get('step', 0)}"
            f"/{status.get('steps', 0)}" + (f", {tokens:,} tokens" if tokens else "")
        )
    metrics = status.get("metrics") or []
    if metrics:
        lines.append("latest: " + format_step_line(metrics[-1], status.get("steps")))
    if status.get("mask_id"):
        lines.append(f"mask: {status['mask_id']}")
    error = status.get("error")
    if error:
        lines.append(f"error: {error.get('type')}: {error.get('message')}")
    out(*lines)
    return EXIT_OK


def cmd_wait(args: argparse.Namespace, settings: CliSettings) -> int:
    with _client(args, settings) as client:
        try:
            return follow_job(client, args.job_id)
        except KeyboardInterrupt:
            out("", f"stopped following; the job goes on (`selprune status {args.job_id}`)")
            return EXIT_INTERRUPTED
