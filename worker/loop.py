"""The outer loop both worker lanes share: turn after turn until stopped, riding out Redis outages.

A lane's `turn()` reads its stream and does one unit of work (a job, a batch). Losing Redis must not
kill a long-lived worker, so connection errors back off (0.5 s doubling to 30 s) and retry; a stream
deleted under us (FLUSHDB, a new Redis) surfaces as NOGROUP and is answered by re-creating the group.
On exit the lane's heartbeat key is deleted, so readiness probes stop counting it at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from protocol import keys

log = logging.getLogger(__name__)

_FIRST_BACKOFF_S, _MAX_BACKOFF_S = 0.5, 30.0


def require_bytes_client(redis_client: redis.Redis, who: str) -> None:
    """Both lanes read mask bits, which are binary: a client that decodes responses would garble them."""
    if redis_client.connection_pool.connection_kwargs.get("decode_responses"):
        raise ValueError(f"the {who} needs a client with decode_responses=False (masks are binary)")


def ensure_group(
    redis_client: redis.Redis, stream: str = keys.JOB_STREAM, group: str = keys.JOB_GROUP
) -> None:
    """Create a lane's stream and consumer group if missing (XGROUP CREATE MKSTREAM, idempotent).

    The group starts at the stream's beginning, so work queued before any worker existed is read: jobs
    run late, and generation requests past their deadline are dropped when read.
    """
    try:
        redis_client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def run_turns(
    label: str,
    stop: threading.Event,
    turn: Callable[[], bool],
    *,
    ensure_group: Callable[[], None],
    redis_client: redis.Redis,
    heartbeat_key: str,
    retry_outages: bool = True,
) -> None:
    """Call `turn` until `stop` is set or a turn returns False (nothing left, in burst mode).

    With `retry_outages` False (burst runs, tests) a Redis outage raises instead of waiting.
    """
    backoff = _FIRST_BACKOFF_S
    try:
        while not stop.is_set():
            try:
                if not turn():
                    return
                backoff = _FIRST_BACKOFF_S
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if not retry_outages:
                    raise
                log.warning("%s: Redis unavailable (%s); retrying in %.1f s", label, exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                ensure_group()  # the stream was deleted under us (FLUSHDB)
    finally:
        try:
            redis_client.delete(heartbeat_key)
        except redis.RedisError:
            pass
