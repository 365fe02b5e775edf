"""Per-tenant slots for long-lived responses (job event streams), so one tenant cannot hold every
connection of the gateway's bounded Redis pool.

Counted per gateway process: each process has its own pool, and the cap protects that pool. A slot is
taken before the response starts (a tenant at its cap gets 429 with Retry-After, and nothing streams)
and given back when the stream ends, however it ends: finished, timed out, or the client gone.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator

from service.errors import ApiError


class StreamSlots:
    def __init__(self, per_tenant: int, max_seconds: float, retry_after_s: int = 5) -> None:
        self.per_tenant = per_tenant
        self.max_seconds = max_seconds
        self.retry_after_s = retry_after_s
        self._open: Counter[str] = Counter()

    def open(self, tenant: str) -> int:
        return self._open[tenant]

    def take(self, tenant: str) -> None:
        """Hold one slot for `tenant`, or raise 429 when it holds them all."""
        if self._open[tenant] >= self.per_tenant:
            raise ApiError(
                429,
                "TooManyStreams",
                f"this key already has {self.per_tenant} event streams open; close one, or poll "
                "GET /v1/jobs/{job_id} instead",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self._open[tenant] += 1

    def give_back(self, tenant: str) -> None:
        self._open[tenant] -= 1
        if self._open[tenant] <= 0:
            del self._open[tenant]

    async def hold(self, tenant: str, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """`stream` under a slot taken with `take`: given back at the end, and cut after max_seconds
        (a client that wants more reconnects with Last-Event-ID and misses nothing)."""
        deadline = time.monotonic() + self.max_seconds
        try:
            async for chunk in stream:
                yield chunk
                if time.monotonic() > deadline:
                    return
        finally:
            self.give_back(tenant)
