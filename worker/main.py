"""`python -m worker`: one worker process against SELPRUNE_REDIS_URL.

Order matters: settings and Redis are checked first (fail fast, before torch is imported), then the
model runtime is built once, then the lanes named by SELPRUNE_ROLES run until SIGTERM/SIGINT: the
job loop in the main thread and the serving loop in a thread beside it (sharing the loaded models), or
either alone. A signal stops them after the job or batch in hand; a second SIGINT interrupts at once
(the job is then redelivered after visibility_timeout).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import redis
from pydantic import ValidationError

from worker.consumer import Job, Worker, ensure_group
from worker.context import JobContext
from worker.errors import WorkerFatalError
from worker.settings import WorkerSettings, get_settings

if TYPE_CHECKING:
    from worker.runtime import ModelRuntime
    from worker.serving import ServeLoop

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
        device_map=settings.device_map,
        max_memory=settings.max_memory,
        max_models=settings.model_cache_size,
        models_root=settings.models_root,
        trusted_models=settings.models,
        hub_datasets=settings.hub_datasets,
    )

    def runner(job: Job, ctx: JobContext) -> dict[str, Any]:
        return run_job(job, runtime, ctx, export_root=settings.export_root)

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info(
            "worker %s: %s received; stopping after the current job or batch",
            settings.worker_id,
            signal.Signals(signum).name,
        )
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("worker %s: roles %s", settings.worker_id, ", ".join(settings.roles))
    serving = _start_serving(settings, runtime, stop) if "serve" in settings.roles else None
    try:
        if "jobs" in settings.roles:
            Worker(settings, client, runner).run(stop_event=stop)
        elif serving is not None:
            stop.wait()
    except WorkerFatalError as exc:
        log.error("worker %s: exiting: %s", settings.worker_id, exc)
        return 1
    finally:
        stop.set()
        if serving is not None:
            serving.join()
        client.close()
    return 1 if serving is not None and serving.failed else 0


class _ServingThread(threading.Thread):
    """The serving lane beside the job loop; if it dies, it stops the whole process (`stop`), so the
    supervisor restarts a worker that serves again instead of one that silently only runs jobs."""

    def __init__(self, loop: ServeLoop, stop: threading.Event) -> None:
        super().__init__(name="selprune-serving", daemon=True)
        self.loop, self.stop, self.failed = loop, stop, False

    def run(self) -> None:
        try:
            self.loop.run(stop_event=self.stop)
        except BaseException:
            log.exception("serving loop crashed; stopping the worker")
            self.failed = True
            self.stop.set()
        finally:
            self.loop.redis.close()


def _start_serving(settings: WorkerSettings, runtime: ModelRuntime, stop: threading.Event) -> _ServingThread:
    from worker.serving import ServeLoop

    thread = _ServingThread(ServeLoop(settings, connect(settings), runtime), stop)
    thread.start()
    return thread


if __name__ == "__main__":
    sys.exit(main())
