"""The commands that run things on this machine: `selprune setup`, `prune`, `up`, `worker` and `demo`.

`setup` and `prune` run in this process (prune without Redis: its progress and masks go to the
console and to files); `up` supervises a local stack of Redis, the gateway and workers; `worker` runs
one worker; `demo` runs the default job on a gateway, starting a local stack when none answers.
torch is imported only where a model runs: prune, and setup (also before up/demo) when it has work to do.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from protocol import EMBEDDED_MODEL, PruneParams
from selprune import generate_command
from selprune.cli_args import (
    DEFAULT_FORGET,
    DEFAULT_RETAIN,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    TOXIC_BUILTINS,
    CliError,
    dataset_spec,
    describe_spec,
    params_from_args,
)
from selprune.client import ClientError, SelpruneClient
from selprune.console import ConsoleContext, err, error_text, out, render_table
from selprune.job_commands import follow_job
from selprune.local_stack import (
    LocalStack,
    StackConfig,
    StackError,
    free_port,
    port_in_use,
    port_taken_message,
    signals_as_interrupt,
)
from selprune.settings import CliSettings
from selprune.setup_assets import ensure_setup, run_setup


def _cache_dir(args: argparse.Namespace, settings: CliSettings) -> Path:
    return Path(getattr(args, "cache_dir", None) or settings.cache_dir).expanduser()


# --- setup and local prune --------------------------------------------------------------------------------
def cmd_setup(args: argparse.Namespace, settings: CliSettings) -> int:
    cache_dir = _cache_dir(args, settings)
    run_setup(cache_dir, corpora=True, corpora_required=True, on_status=out)
    out(f"setup complete: cache in {cache_dir}")
    return EXIT_OK


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
    ensure_setup(cache_dir, model=job.model == EMBEDDED_MODEL, corpora=toxic, on_status=out)
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
        device_map=settings.device_map,
        max_memory=settings.max_memory,
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
    out(f"mask {result['mask_id']} (stopped: {result['stopped_reason']})", ctx.clock.summary())
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
        ensure_setup(cfg.cache_dir, model=True, corpora=False, on_status=out)
        stack = LocalStack(cfg, on_status=out)
        try:
            stack.start()
            _print_stack(stack)
            code = then(stack)
        except KeyboardInterrupt:
            out("", "interrupted")
            code = EXIT_INTERRUPTED
        except (ClientError, StackError) as exc:
            err(error_text(exc))
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


# --- the demo ----------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace, settings: CliSettings) -> int:
    url = args.url or settings.url
    client = SelpruneClient(url, args.api_key or settings.api_key)
    if client.healthy():
        out(f"using the gateway at {url}")
        with client:
            return _run_demo(client, stack_owned=False, full=args.full)
    client.close()
    out(f"no gateway at {url}; starting a local stack for the demo")
    port = settings.port if not port_in_use("127.0.0.1", settings.port) else free_port()
    api_key = args.api_key or settings.api_key or _first_api_key(settings)

    def then(stack: LocalStack) -> int:
        with SelpruneClient(stack.url, api_key) as local:
            return _run_demo(local, stack_owned=True, full=args.full)

    return _with_stack(_stack_config(args, settings, "127.0.0.1", port), then)


# The demo job: the default recipe under a retain budget. Steps that would raise prose perplexity by
# more than 10% (checked on a validation carve-out of the train texts) are retried smaller; the job
# stops once code top-1 has dropped 60% there. docs/results.md measures this job on held-out texts.
DEMO_FULL_PARAMS: dict[str, Any] = {
    "steps": 10,
    "budget": {"max_retain_ppl_increase": 0.1, "forget_target": 0.6},
}
# The default demo is the same job on smaller samples, sized so its job phase takes about 2 minutes
# on 2 CPU cores (measured: README, "Quick start") and still shows the verdict: held-out code top-1
# drops several times more than prose top-1, with confidence intervals. `selprune demo --full` runs
# the job above with the service's default budgets.
DEMO_PARAMS: dict[str, Any] = {
    **DEMO_FULL_PARAMS,
    "collect_tokens": 2_000,
    "eval_tokens": 1_000,
    "token_limit": 256,
}


def demo_body(*, full: bool = False) -> dict[str, Any]:
    """The demo's POST /v1/unlearn body."""
    return {
        "forget": dataset_spec(DEFAULT_FORGET),
        "retain": dataset_spec(DEFAULT_RETAIN),
        "name": "demo: forget Python code, keep English prose" + (" (full)" if full else ""),
        "params": DEMO_FULL_PARAMS if full else DEMO_PARAMS,
    }


def _run_demo(client: SelpruneClient, *, stack_owned: bool, full: bool = False) -> int:
    job_id = client.submit_unlearn(demo_body(full=full))
    out(
        "",
        f"submitted job {job_id}: unlearn {DEFAULT_FORGET}, keep {DEFAULT_RETAIN} on {EMBEDDED_MODEL}",
        f"(follow it elsewhere with `selprune wait {job_id} --url {client.url}`)",
    )
    try:
        code = follow_job(client, job_id)
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
