"""`selprune`: the command line.

    selprune setup                 make the embedded model and the built-in corpora ready (once)
    selprune prune [...]           run an unlearning job locally, in this process (no Redis)
    selprune up [--port P]         start a local stack: Redis, the gateway and a worker
    selprune worker                run one worker against SELPRUNE_REDIS_URL
    selprune demo                  run the default unlearning job on a gateway (a local one if none)
    selprune submit|status|wait    client side: SELPRUNE_URL, SELPRUNE_API_KEY
    selprune generate PROMPT       generate through the gateway, optionally with a mask (--mask)

Only this module prints (and selprune/generate_command.py, which writes generated text as it streams).
torch is imported only by the subcommands that run a model (setup, prune, and up/demo when setup is
still needed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError

from protocol import EMBEDDED_MODEL, PRESETS, PruneParams
from selprune import generate_command
from selprune.cli_args import (
    DEFAULT_FORGET,
    DEFAULT_RETAIN,
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    TOXIC_BUILTINS,
    CliError,
    add_job_args,
    dataset_spec,
    describe_spec,
    params_from_args,
)
from selprune.client import ApiError, ClientError, SelpruneClient
from selprune.console import ConsoleContext, follow_events, format_step_line, phase_label, render_table
from selprune.launcher import (
    LauncherError,
    LocalStack,
    StackConfig,
    free_port,
    missing_setup,
    port_in_use,
    port_taken_message,
    run_setup,
    signals_as_interrupt,
)
from selprune.settings import CliSettings


# --- output -----------------------------------------------------------------------------------------------
def out(*lines: str) -> None:
    """Write lines to stdout (results, tables, what happened)."""
    for line in lines:
        print(line, flush=True)


def err(message: str) -> None:
    """Write an error or warning to stderr."""
    print(f"selprune: {message}", file=sys.stderr, flush=True)


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="gateway URL (default: SELPRUNE_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="Bearer key (default: SELPRUNE_API_KEY)")


def _client(args: argparse.Namespace, settings: CliSettings) -> SelpruneClient:
    return SelpruneClient(args.url or settings.url, args.api_key or settings.api_key)


def _cache_dir(args: argparse.Namespace, settings: CliSettings) -> Path:
    return Path(getattr(args, "cache_dir", None) or settings.cache_dir).expanduser()


def _stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument("--cache-dir", help="model and corpus cache, and child logs (default: SELPRUNE_CACHE_DIR)")
    p.add_argument("--data-root", help="folder of file: datasets (default: SELPRUNE_DATA_ROOT or ./data)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /readyz (300)")


# --- setup and local prune --------------------------------------------------------------------------------
def cmd_setup(args: argparse.Namespace, settings: CliSettings) -> int:
    cache_dir = _cache_dir(args, settings)
    run_setup(cache_dir, corpora=True, corpora_required=True, on_status=out)
    out(f"setup complete: cache in {cache_dir}")
    return EXIT_OK


def _ensure_setup(cache_dir: Path, *, model: bool, corpora: bool) -> None:
    """Run setup first if what a command needs is missing (the same steps as `selprune setup`)."""
    missing = missing_setup(cache_dir, corpora=corpora)
    if not model:
        missing = [m for m in missing if m == "corpora"]
    if missing:
        out(f"first run: preparing {', '.join(missing)} in {cache_dir}")
        run_setup(cache_dir, corpora=corpora, corpora_required=True, on_status=out)


def cmd_prune(args: argparse.Namespace, settings: CliSettings) -> int:
    from protocol import PruneJob

    params = PruneParams.model_validate(params_from_args(args))
    job = PruneJob.model_validate(
        {
            "job_id": f"local-{uuid.uuid4().hex[:12]}",
            "tenant": "local",
            "model": args.model,
            "forget": args.forget,
            "retain": args.retain,
            "name": args.name,
            "params": params.model_dump(),
        }
    )
    cache_dir = _cache_dir(args, settings)
    toxic = any(s.get("name") in TOXIC_BUILTINS for s in (args.forget, args.retain))
    _ensure_setup(cache_dir, model=job.model == EMBEDDED_MODEL, corpora=toxic)
    out(
        f"pruning {job.model}: forget {describe_spec(args.forget)}, retain {describe_spec(args.retain)}; "
        f"{params.steps} steps of {params.ff_frac:g} FF / {params.attn_frac:g} attention, "
        f"scoring {params.ff_scoring}{', random baseline' if params.random_baseline else ''}"
    )

    from selprune_core.errors import SelPruneError
    from worker.errors import JobError
    from worker.jobs import run_prune
    from worker.runtime import ModelRuntime

    runtime = ModelRuntime(
        cache_dir=cache_dir,
        data_root=Path(args.data_root or settings.data_root).expanduser(),
        device=args.device or settings.device,
        dtype=args.dtype or settings.dtype,
    )
    collect = {"collecting_retain": params.collect_tokens, "collecting_forget": params.collect_tokens}
    ctx = ConsoleContext(Path(args.out), phase_totals=collect)
    try:
        result = run_prune(job, runtime, ctx)
    except (SelPruneError, JobError) as exc:
        raise CliError(f"{type(exc).__name__}: {exc}") from None
    finally:
        ctx.close()
    out("", render_table(ctx.steps), "")
    out(f"mask {result['mask_id']} (stopped: {result['stopped_reason']})")
    if ctx.mask_path is not None:
        out(f"saved to {ctx.mask_path} (metadata: {ctx.mask_path.with_suffix('.json')})")
        try:  # the trade-off plot next to the mask; a convenience, so a failure only warns
            from worker.plots import render_job_plot

            plot_path = ctx.mask_path.with_suffix(".png")
            plot_path.write_bytes(render_job_plot(ctx.steps, title=f"forget {describe_spec(args.forget)}"))
            out(f"plot: {plot_path}")
        except Exception as exc:
            err(f"could not write the plot: {type(exc).__name__}: {exc}")
    return EXIT_OK


# --- the local stack ---------------------------------------------------------------------------------------
def _stack_config(args: argparse.Namespace, settings: CliSettings, host: str, port: int) -> StackConfig:
    return StackConfig(
        host=host,
        port=port,
        workers=args.workers,
        cache_dir=_cache_dir(args, settings),
        data_root=Path(args.data_root or settings.data_root),
        redis_url=settings.redis_url,
        ready_timeout=args.ready_timeout,
    )


def _print_stack(stack: LocalStack) -> None:
    out(
        "",
        f"selprune is up: API  {stack.url}",
        f"                docs {stack.url}/docs",
        f"                Redis {_redact(stack.redis_url or '')}",
        f"logs: {stack.log_dir}/ ({', '.join(c.log_path.name for c in stack.children)})",
    )


def _redact(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def cmd_up(args: argparse.Namespace, settings: CliSettings) -> int:
    if args.workers < 1:
        raise CliError("--workers must be at least 1", EXIT_USAGE)
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    if port_in_use(host, port):  # before starting anything
        raise CliError(port_taken_message(host, port))

    def then(stack: LocalStack) -> int:
        if args.demo:
            with SelpruneClient(stack.url, settings.api_key or _first_api_key(settings)) as client:
                return _run_demo(client, stack_owned=True)
        out("press Ctrl-C to stop")
        try:
            stack.supervise()
        except KeyboardInterrupt:  # the normal way to stop `up`
            out("")
        return EXIT_OK

    return _with_stack(_stack_config(args, settings, host, port), then)


def _with_stack(cfg: StackConfig, then: Callable[[LocalStack], int]) -> int:
    """Start a local stack, run `then(stack)`, and stop the stack whatever happens (Ctrl-C, SIGTERM,
    a failed child); errors are reported before the stack stops, so they are not lost in its logs."""
    code = EXIT_OK
    with signals_as_interrupt():
        _ensure_setup(cfg.cache_dir, model=True, corpora=False)
        stack = LocalStack(cfg, on_status=out)
        try:
            stack.start()
            _print_stack(stack)
            code = then(stack)
        except KeyboardInterrupt:
            out("", "interrupted")
            code = EXIT_INTERRUPTED
        except (ClientError, LauncherError) as exc:
            err(_error_text(exc))
            code = EXIT_ERROR
        finally:
            out("stopping the local stack...")
            stack.stop()
    out("stopped")
    return code


def _first_api_key(settings: CliSettings) -> str | None:
    """For a stack we start ourselves: the first of SELPRUNE_API_KEYS, if the gateway will require one."""
    keys = [k.strip() for k in settings.api_keys.split(",") if k.strip()]
    return keys[0] if keys else None


def cmd_worker(args: argparse.Namespace, settings: CliSettings) -> int:
    try:
        from worker.settings import apply_process_defaults

        apply_process_defaults()  # before worker.main imports torch
        from worker.main import main as worker_main
    except ImportError as exc:
        raise CliError(f"the worker is not available in this install: {exc}") from None
    code = worker_main()
    return code if isinstance(code, int) else EXIT_OK


# --- demo and client commands ------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace, settings: CliSettings) -> int:
    url = args.url or settings.url
    client = SelpruneClient(url, args.api_key or settings.api_key)
    if client.healthy():
        out(f"using the gateway at {url}")
        with client:
            return _run_demo(client, stack_owned=False)
    client.close()
    out(f"no gateway at {url}; starting a local stack for the demo")
    port = settings.port if not port_in_use("127.0.0.1", settings.port) else free_port()
    api_key = args.api_key or settings.api_key or _first_api_key(settings)

    def then(stack: LocalStack) -> int:
        with SelpruneClient(stack.url, api_key) as local:
            return _run_demo(local, stack_owned=True)

    return _with_stack(_stack_config(args, settings, "127.0.0.1", port), then)


# The demo job: the default recipe under a retain budget. Steps that would raise prose perplexity by
# more than 10% (checked on a validation carve-out of the train texts) are retried smaller; the job
# stops once code top-1 has dropped 60% there. docs/results.md measures this job on held-out texts.
DEMO_PARAMS: dict[str, Any] = {
    "steps": 10,
    "budget": {"max_retain_ppl_increase": 0.1, "forget_target": 0.6},
}


def _run_demo(client: SelpruneClient, *, stack_owned: bool) -> int:
    body = {
        "forget": dataset_spec(DEFAULT_FORGET),
        "retain": dataset_spec(DEFAULT_RETAIN),
        "name": "demo: forget Python code, keep English prose",
        "params": DEMO_PARAMS,
    }
    job_id = client.submit_unlearn(body)
    out(
        "",
        f"submitted job {job_id}: unlearn {DEFAULT_FORGET}, keep {DEFAULT_RETAIN} on {EMBEDDED_MODEL}",
        f"(follow it elsewhere with `selprune wait {job_id} --url {client.url}`)",
    )
    try:
        code = _follow(client, job_id)
        mask_id = client.job(job_id).get("mask_id") if code == EXIT_OK else None
        if mask_id:  # the pruned model, served: without the mask and through it, on code and on prose
            for prompt in generate_command.DEMO_PROMPTS:
                out("", generate_command.before_after(client, str(mask_id), prompt))
        return code
    except KeyboardInterrupt:
        if not stack_owned:  # our stack dies with us; a shared gateway keeps the job unless we cancel it
            out("", f"cancelling job {job_id}")
            client.cancel(job_id)
        raise


def _follow(client: SelpruneClient, job_id: str) -> int:
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
            return _follow(client, args.job_id)
        except KeyboardInterrupt:
            out("", f"stopped following; the job goes on (`selprune status {args.job_id}`)")
            return EXIT_INTERRUPTED


# --- the parser -----------------------------------------------------------------------------------------
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
    p.set_defaults(func=cmd_setup)

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
    p.add_argument("--dtype", help="auto, float32, bfloat16, float16 (default: SELPRUNE_DTYPE or auto)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("up", help="start Redis (unless SELPRUNE_REDIS_URL), the gateway and workers")
    p.add_argument("--host", help="gateway bind address (default: SELPRUNE_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="gateway port (default: SELPRUNE_PORT or 8000)")
    _stack_args(p)
    p.add_argument("--demo", action="store_true", help="run the demo once ready, then stop")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("worker", help="run one worker in this process (needs SELPRUNE_REDIS_URL)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("demo", help="run the default unlearning job (on a local stack if no gateway runs)")
    _add_client_args(p)
    _stack_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("submit", help="submit an unlearning job; prints its id")
    _add_client_args(p)
    add_job_args(p)
    p.add_argument("--idempotency-key", help="repeat a submission without creating a second job")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="a recommended job (e.g. detox); flags override it"
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="show a job's state, phase and latest metrics")
    _add_client_args(p)
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print the full status as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("wait", help="follow a job to its end and print the before/after table")
    _add_client_args(p)
    p.add_argument("job_id")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("generate", help="generate text through the gateway, with a mask applied (--mask)")
    _add_client_args(p)
    generate_command.add_arguments(p)
    p.set_defaults(func=generate_command.cmd_generate)
    return parser


def _error_text(exc: Exception) -> str:
    if isinstance(exc, ApiError):
        return f"the gateway answered {exc.status} {exc.type}: {exc.message}"
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "worker":  # the worker configures its own logging (SELPRUNE_LOG_LEVEL)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
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
    except (ClientError, LauncherError) as exc:
        err(_error_text(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `selprune status --json | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
