"""`python -m worker`: one worker process against SELPRUNE_REDIS_URL.

Order matters: settings and Redis are checked first (fail fast, before torch is imported), then the
model runtime is built once, then the loop runs until SIGTERM/SIGINT, which stop it after the job in
hand. A second SIGINT interrupts at once (the job is then redelivered after visibility_timeout).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import redis
from pydantic import ValidationError

from worker.context import JobContext
from worker.errors import WorkerFatalError
from worker.queue import Job, Worker, ensure_group
from worker.settings import WorkerSettings, get_settings

log = logging.getLogger(__name__)


def connect(settings: WorkerSettings) -> redis.Redis:
    """A bytes-returning client, checked with PING; SystemExit with a clear message if unreachable."""
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=30)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise SystemExit(f"selprune worker: cannot reach Redis at {settings.redis_url}: {exc}") from exc
    return client


def main(argv: Sequence[str] | None = None) -> int:
    del argv  # no options yet: everything comes from SELPRUNE_* variables
    try:
        settings = get_settings()
    except ValidationError as exc:
        raise SystemExit(f"selprune worker: invalid settings (SELPRUNE_* variables):\n{exc}") from exc
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    client = connect(settings)
    ensure_group(client)

    # Heavy imports (torch, transformers) only once Redis is known to be there.
    from worker.jobs import run_job
    from worker.runtime import ModelRuntime

    runtime = ModelRuntime(
        cache_dir=settings.cache_dir,
        data_root=settings.data_root,
        device=settings.device,
        dtype=settings.dtype,
        max_models=settings.model_cache_size,
    )

    def runner(job: Job, ctx: JobContext) -> dict[str, Any]:
        return run_job(job, runtime, ctx, export_root=settings.export_root)

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info(
            "worker %s: %s received; stopping after the current job",
            settings.worker_id,
            signal.Signals(signum).name,
        )
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        Worker(settings, client, runner).run(stop_event=stop)
    except WorkerFatalError as exc:
        log.error("worker %s: exiting: %s", settings.worker_id, exc)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
