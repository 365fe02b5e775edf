"""GET /metrics in the Prometheus text format, written by hand (no client library).

Durations are summaries over the recent window the worker keeps (keys.DURATIONS_KEPT values), so their
_count and _sum describe that window, not the process lifetime.
"""

from __future__ import annotations

import math

from protocol import keys
from service.queue_client import QueueClient
from service.serving_client import ServingClient
from service.settings import GatewaySettings

QUANTILES = (0.5, 0.9, 0.99)


def _num(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile; NaN for no values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _header(lines: list[str], name: str, kind: str, help: str) -> None:
    lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]


def _summary(lines: list[str], name: str, help: str, values: list[float]) -> None:
    _header(lines, name, "summary", help)
    ordered = sorted(values)
    lines += [f'{name}{{quantile="{q}"}} {_num(_quantile(ordered, q))}' for q in QUANTILES]
    lines += [f"{name}_sum {_num(sum(ordered))}", f"{name}_count {len(ordered)}"]


async def render_metrics(queue: QueueClient, serving: ServingClient, settings: GatewaySettings) -> str:
    lines: list[str] = []
    depth, pending = await queue.queue_depth()
    _header(lines, "selprune_queue_depth", "gauge", "Jobs in the queue stream not yet taken by a worker.")
    lines.append(f"selprune_queue_depth {depth}")
    _header(lines, "selprune_queue_pending", "gauge", "Jobs taken by a worker and not yet acknowledged.")
    lines.append(f"selprune_queue_pending {pending}")
    counts = await queue.job_state_counts(settings.metrics_scan_limit)
    _header(
        lines, "selprune_jobs", "gauge", f"Jobs by state (over the newest {settings.metrics_scan_limit})."
    )
    lines += [f'selprune_jobs{{state="{state}"}} {n}' for state, n in sorted(counts.items())]
    _header(lines, "selprune_workers", "gauge", "Workers with a live heartbeat.")
    lines.append(f"selprune_workers {await queue.worker_count()}")
    _summary(
        lines,
        "selprune_job_duration_seconds",
        "Wall time of recent finished jobs.",
        await queue.durations(keys.JOB_DURATIONS_KEY),
    )
    _summary(
        lines,
        "selprune_step_duration_seconds",
        "Wall time of recent pruning steps.",
        await queue.durations(keys.STEP_DURATIONS_KEY),
    )
    _header(
        lines, "selprune_generate_waiting", "gauge", "Generation requests not yet read by a serving worker."
    )
    lines.append(f"selprune_generate_waiting {await serving.waiting()}")
    _header(lines, "selprune_servers", "gauge", "Serving workers with a live heartbeat.")
    lines.append(f"selprune_servers {len(await serving.servers())}")
    _summary(
        lines,
        "selprune_generate_batch_seconds",
        "Time in the model of recent serving batches.",
        await queue.durations(keys.GENERATE_BATCH_SECONDS_KEY),
    )
    _summary(
        lines,
        "selprune_generate_batch_rows",
        "Rows (requests x choices) of recent serving batches.",
        await queue.durations(keys.GENERATE_BATCH_ROWS_KEY),
    )
    return "\n".join(lines) + "\n"
