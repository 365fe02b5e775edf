"""`selprune`: the command line's parser and entry point (the `selprune` console script).

    selprune setup                 make the embedded model and the built-in corpora ready (once)
    selprune prune [...]           run an unlearning job locally, in this process (no Redis)
    selprune up [--port P]         start a local stack: Redis, the gateway and a worker
    selprune worker                run one worker against SELPRUNE_REDIS_URL
    selprune demo                  run the default unlearning job on a gateway (a local one if none)
    selprune submit|status|wait    client side: SELPRUNE_URL, SELPRUNE_API_KEY
    selprune generate PROMPT       generate through the gateway, optionally with a mask (--mask)
    selprune classify IMAGE...     classify images through the gateway (image classifiers)
    selprune fill-mask TEXT...     fill "<mask>" in texts through the gateway (masked LMs)
    selprune families              the model families selprune is checked on, with their hook sites

The commands live by family: selprune/local_commands.py (setup, prune, up, worker, demo),
selprune/job_commands.py (submit, status, wait), selprune/generate_command.py (generate) and
selprune/predict_commands.py (classify, fill-mask). They write
to the terminal through selprune/console.py; generate_command also streams generated text to stdout.
torch is imported only by the subcommands that run a model (setup, prune, and up/demo when setup is
still needed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from protocol import PRESETS
from selprune import families_command, generate_command, job_commands, local_commands, predict_commands
from selprune.cli_args import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError, add_job_args
from selprune.client import ClientError
from selprune.console import err, error_text
from selprune.local_stack import StackError
from selprune.settings import CliSettings
from selprune.setup_assets import SetupError


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="gateway URL (default: SELPRUNE_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="Bearer key (default: SELPRUNE_API_KEY)")


def _stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument("--cache-dir", help="model and corpus cache, and child logs (default: SELPRUNE_CACHE_DIR)")
    p.add_argument("--data-root", help="folder of file: datasets (default: SELPRUNE_DATA_ROOT or ./data)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /readyz (300)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selprune",
        description="Unlearning as a service: selective pruning of language-model neurons.",
        epilog="Exit codes: 0 ok, 1 error or failed job, 2 usage, 3 cancelled job, 130 interrupted.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("setup", help="make the embedded model and built-in corpora ready (idempotent)")
    p.add_argument("--cache-dir", help="cache folder (default: SELPRUNE_CACHE_DIR or ~/.cache/selprune)")
    p.set_defaults(func=local_commands.cmd_setup)

    p = sub.add_parser("prune", help="run an unlearning job locally, without Redis")
    add_job_args(p)
    p.add_argument(
        "--out",
        default="masks",
        help="folder for <mask_id>.safetensors, .json and the trade-off plot .png (./masks)",
    )
    p.add_argument("--cache-dir", help="cache folder (default: SELPRUNE_CACHE_DIR or ~/.cache/selprune)")
    p.add_argument("--data-root", help="folder of file: datasets (default: SELPRUNE_DATA_ROOT or ./data)")
    p.add_argument("--device", help="auto, cpu, cuda[:N] (default: SELPRUNE_DEVICE or auto)")
    p.add_argument(
        "--dtype",
        help="auto, float32, bfloat16, float16 (default: SELPRUNE_DTYPE or auto; auto is bfloat16 on GPUs "
        "that support it and on CPUs with AVX512-BF16 or AMX, float16 on older GPUs, else float32)",
    )
    p.set_defaults(func=local_commands.cmd_prune)

    p = sub.add_parser("up", help="start Redis (unless SELPRUNE_REDIS_URL), the gateway and workers")
    p.add_argument("--host", help="gateway bind address (default: SELPRUNE_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="gateway port (default: SELPRUNE_PORT or 8000)")
    _stack_args(p)
    p.add_argument("--demo", action="store_true", help="run the demo once ready, then stop")
    p.set_defaults(func=local_commands.cmd_up)

    p = sub.add_parser("worker", help="run one worker in this process (needs SELPRUNE_REDIS_URL)")
    p.set_defaults(func=local_commands.cmd_worker)

    p = sub.add_parser("demo", help="run the default unlearning job (on a local stack if no gateway runs)")
    _add_client_args(p)
    _stack_args(p)
    p.add_argument(
        "--full",
        action="store_true",
        help="the full-size job: 10,000 statistics tokens, 5,000 evaluation predictions, 512-token texts "
        "(about 15 minutes on 2 CPU cores, against about 2 for the default)",
    )
    p.set_defaults(func=local_commands.cmd_demo)

    p = sub.add_parser("submit", help="submit an unlearning job; prints its id")
    _add_client_args(p)
    add_job_args(p)
    p.add_argument("--idempotency-key", help="repeat a submission without creating a second job")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="a recommended job (e.g. detox); flags override it"
    )
    p.set_defaults(func=job_commands.cmd_submit)

    p = sub.add_parser("status", help="show a job's state, phase and latest metrics")
    _add_client_args(p)
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print the full status as JSON")
    p.set_defaults(func=job_commands.cmd_status)

    p = sub.add_parser("wait", help="follow a job to its end and print the before/after table")
    _add_client_args(p)
    p.add_argument("job_id")
    p.set_defaults(func=job_commands.cmd_wait)

    p = sub.add_parser("generate", help="generate text through the gateway, with a mask applied (--mask)")
    _add_client_args(p)
    generate_command.add_arguments(p)
    p.set_defaults(func=generate_command.cmd_generate)

    p = sub.add_parser("classify", help="classify images through the gateway, with a mask applied (--mask)")
    _add_client_args(p)
    predict_commands.add_classify_arguments(p)
    p.set_defaults(func=predict_commands.cmd_classify)

    p = sub.add_parser("fill-mask", help='fill "<mask>" in texts through the gateway (--mask to apply one)')
    _add_client_args(p)
    predict_commands.add_fill_mask_arguments(p)
    p.set_defaults(func=predict_commands.cmd_fill_mask)

    p = sub.add_parser(
        "families", help="list the model families selprune is checked on, and their hook sites"
    )
    families_command.add_arguments(p)
    p.set_defaults(func=families_command.cmd_families)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "worker":  # the worker configures its own logging (SELPRUNE_LOG_LEVEL)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        # A built-in model's one-off training takes minutes: say so even without --verbose. (The name
        # is selprune_core.training_log.LOGGER; importing it here would import torch.)
        logging.getLogger("selprune_core.training").setLevel(logging.INFO)
    try:
        settings = CliSettings()
    except ValidationError as exc:
        err(f"invalid SELPRUNE_* setting: {exc}")
        return EXIT_USAGE
    func: Callable[[argparse.Namespace, CliSettings], int] = args.func
    try:
        return func(args, settings)
    except CliError as exc:
        err(str(exc))
        return exc.code
    except (ClientError, SetupError, StackError) as exc:
        err(error_text(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `selprune status --json | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
