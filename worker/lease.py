"""The job lease: the one thing that makes a job run on a single worker at a time.

A worker runs a job only while it holds the job's lease: `JOB_LEASE_KEY` set with SET NX PX to a
token unique to this run, renewed by a `LeaseKeeper` thread. A worker that stalls past the TTL (a long
pause, a partition) can find the lease taken by another worker; from then on it is *fenced off*:
every write that matters (a step, the final state) is a WATCH/MULTI transaction (`Lease.transaction`)
that first checks the lease still holds our token, so a fenced-off worker never appends a duplicate
step or overwrites the new holder's result.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.client import Pipeline

from protocol import keys

__all__ = ["Lease", "LeaseKeeper"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Renew our lease; take it back if it expired and nobody else took it (nobody ran the job meanwhile:
# running needs the lease). KEYS: lease. ARGV: token, ttl ms. Returns 1 if held after the call.
_RENEW_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# Delete the lease only if it is still ours. KEYS: lease. ARGV: token.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """This worker's claim on one job. `lost` is set once the lease turns out to be someone else's."""

    def __init__(self, redis_client: redis.Redis, job_id: str, owner: str, ttl_seconds: float) -> None:
        self.redis = redis_client
        self.key = keys.JOB_LEASE_KEY.format(job_id=job_id)
        self.token = f"{owner}:{secrets.token_hex(4)}"  # unique per run, even for the same worker
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.lost = threading.Event()
        self._renew = redis_client.register_script(_RENEW_LUA)
        self._release = redis_client.register_script(_RELEASE_LUA)

    def acquire(self) -> bool:
        """Take the lease if nobody holds it."""
        return bool(self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def holder(self) -> str | None:
        raw = self.redis.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw

    def renew(self) -> bool:
        """Extend the TTL; False (and `lost` set) when another worker holds the lease now."""
        if self.lost.is_set():
            return False
        if self._renew(keys=[self.key], args=[self.token, self.ttl_ms]) == 1:
            return True
        self.lost.set()
        return False

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.token])

    def transaction(self, func: Callable[[Pipeline], T], *also_watch: str) -> tuple[bool, T | None]:
        """Run `func` in a WATCH/MULTI transaction on the lease (and `also_watch` keys), only while
        the lease is ours. `func` may read in immediate mode, then calls `pipe.multi()` and queues
        writes; it is retried if a watched key changes. Returns (held, func's value)."""

        while True:
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.key, *also_watch)  # type: ignore[no-untyped-call]  # untyped in redis-py
                    raw = pipe.get(self.key)
                    if (raw.decode() if isinstance(raw, bytes) else raw) != self.token:
                        self.lost.set()
                        return False, None
                    value = func(pipe)
                    pipe.execute()
                    return True, value
                except redis.WatchError:
                    continue  # a watched key changed (a renewal, a cancel request): read again


class LeaseKeeper(threading.Thread):
    """Renews a lease every `interval` seconds while its job runs, then calls `on_beat(renewed)` (the
    consumer touches the job's stream entry when renewed, and its own heartbeat key always)."""

    def __init__(self, lease: Lease, job_id: str, interval: float, on_beat: Callable[[bool], None]) -> None:
        super().__init__(name=f"selprune-lease-{job_id}", daemon=True)
        self.lease, self.job_id, self.interval, self.on_beat = lease, job_id, interval, on_beat
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                renewed = False
                if not self.lease.lost.is_set():
                    renewed = self.lease.renew()
                    if not renewed:
                        log.warning(
                            "job %s: lease taken by %s; fencing off", self.job_id, self.lease.holder()
                        )
                self.on_beat(renewed)
            except Exception:  # a Redis hiccup must not kill the thread; the next beat retries
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)

    def __enter__(self) -> LeaseKeeper:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join()
