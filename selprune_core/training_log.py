"""Progress lines for the built-in models' one-off training (the digits ViT, the code/prose MLM).

A worker trains each on first use, for one to several minutes on a CPU, while its job sits in
"loading model"; these lines (INFO, every tenth of the run) say that it is training, how far it is,
and how long the rest will take. They go to the `selprune_core.training` logger, which the command line
shows even without --verbose.
"""

from __future__ import annotations

import logging
import time

LOGGER = "selprune_core.training"


class TrainingLog:
    """Logs `name: step i/total (p%), loss x, elapsed s, about r s left` at each tenth of `total`."""

    def __init__(self, name: str, total: int, parts: int = 10) -> None:
        self.log, self.name, self.total = logging.getLogger(LOGGER), name, max(1, total)
        self.every = max(1, self.total // parts)
        self.started = time.perf_counter()
        self.log.info("training %s: %d steps", name, self.total)

    def step(self, done: int, loss: float) -> None:
        """Call after step `done` (1-based) with its loss."""
        if done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.started
        left = elapsed * (self.total - done) / done
        self.log.info(
            "training %s: step %d/%d (%.0f%%), loss %.3f, %.0f s, about %.0f s left",
            self.name, done, self.total, 100 * done / self.total, loss, elapsed, left,
        )  # fmt: skip
