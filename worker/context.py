"""The seam between a job function and whoever runs it (the Redis worker, or the local CLI).

Job functions in worker/jobs.py never touch Redis; they report through a JobContext. The queue
implements it on Redis (progress hash, step list, checkpoint, mask store); `selprune prune` implements
it on the console. Both run the same job code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from protocol import JobProgress

T = TypeVar("T")


class JobContext(Protocol):
    def progress(self, progress: JobProgress) -> None:
        """Record where the job is (phase, step, tokens); called often, must be cheap."""

    def step_done(self, report: dict[str, Any], checkpoint: bytes) -> None:
        """Persist one completed pruning step: its report (JSON-able) and the mask after it.

        Must be atomic: after a crash the job resumes from the last step recorded here.
        """

    def completed_steps(self) -> list[dict[str, Any]]:
        """Reports of the steps already completed by an earlier attempt (empty on a first run)."""

    def checkpoint(self) -> bytes | None:
        """The mask bytes after the last completed step, or None."""

    def should_cancel(self) -> bool:
        """True once the job must stop (the caller asked to cancel, or the job ran out of time);
        checked between phases and batches."""

    def store_mask(self, mask_bytes: bytes, meta: dict[str, Any]) -> str:
        """Store the final mask (immutable, content-addressed); returns its id."""

    def load_mask(self, mask_id: str) -> bytes:
        """Bytes of a stored mask the job's tenant may use; raises MaskNotFoundError otherwise."""


@runtime_checkable
class PlotSink(Protocol):
    """A context that can keep a job's trade-off plot (the Redis worker does; the local CLI writes its
    own file at the end). Optional, so that a JobContext without it still runs every job."""

    def store_plot(self, png: bytes) -> None:
        """Replace the job's plot with these PNG bytes."""


@runtime_checkable
class LeaseGuard(Protocol):
    """A context whose job another runner may take over (the Redis worker's lease). A job commits a
    side effect outside the context, such as an export's files, only through `while_owner`, so a
    fenced-off run never replaces what the job's new owner writes."""

    def while_owner(self, action: Callable[[], T]) -> T:
        """Run `action` (something quick, like a rename) while this run still owns the job; raise
        LeaseLostError without running it otherwise."""
