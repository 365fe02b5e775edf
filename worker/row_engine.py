"""RowEngine: the serving lane's one-forward requests (classification, fill-mask), every input a row
through its own mask.

The serving loop (worker/serving.py) hands an engine the tasks of its kind read in one turn; the engine
groups them by model and answers each with one done or error event. Masks come from the same
device-resident `MaskTable` mechanism as generation (worker/mask_table.py, one table per model; a row
is a slot, slot 0 unmasked), and rows of different masks run as one forward pass through
`apply_row_masks` with the per-row keep factors the table gathers, `max_rows` rows at a time. There is
no decoding loop: every task of a turn is answered in that turn.

A subclass says what its model is (`target`: ConfigError for another kind, answered
`ModelKindMismatch`), how a task becomes rows (`prepare`: ServeError names the bad input), what a
forward pass over some rows gives per row (`compute`), and how a task's row outputs become its answer
(`answer`). A request that fails fails alone; only a device failure (worker/errors.py `classify`)
fails everything and stops the worker.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch

from protocol import ClassifyTask, FillMaskTask, GenerateTimings
from selprune_core.errors import ConfigError
from selprune_core.masking import apply_row_masks
from selprune_core.sites import ModelSites
from worker.errors import Outcome, WorkerFatalError, classify
from worker.mask_table import MaskTable
from worker.runtime import ModelRuntime
from worker.serve_engine import MaskLoader, ServeError, failed, mask_slot

__all__ = ["RowEngine", "RowTarget"]

log = logging.getLogger(__name__)


class RowTarget(Protocol):
    @property
    def sites(self) -> ModelSites: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def device(self) -> torch.device: ...


TaskT = TypeVar("TaskT", ClassifyTask, FillMaskTask)  # one-forward requests of the serving lane
TargetT = TypeVar("TargetT", bound=RowTarget)
DoneT = TypeVar("DoneT")


@dataclass
class _Prepared(Generic[TaskT]):
    task: TaskT
    slot: int  # mask table slot; 0 = unmasked
    rows: list[Any]  # what `compute` takes, one item per row


class RowEngine(ABC, Generic[TaskT, TargetT, DoneT]):
    what = "the request"  # in error messages: "<what> failed"

    def __init__(
        self, runtime: ModelRuntime, load_mask: MaskLoader, *, mask_slots: int, max_rows: int = 64
    ) -> None:
        self.runtime = runtime
        self.load_mask = load_mask
        self.mask_slots = mask_slots
        self.max_rows = max_rows  # rows per forward pass
        self._tables: dict[str, MaskTable] = {}  # model ref -> its masks on its device

    # What a subclass says ---------------------------------------------------------------------------
    @abstractmethod
    def target(self, ref: str) -> TargetT:
        """The loaded model `ref` names; ConfigError when it is of another kind."""

    @abstractmethod
    def prepare(self, task: TaskT, target: TargetT) -> list[Any]:
        """The task's rows as `compute` takes them; ServeError naming a bad input."""

    @abstractmethod
    def compute(self, target: TargetT, rows: list[Any]) -> list[Any]:
        """One output per row of one forward pass (run under inference mode and the rows' masks)."""

    @abstractmethod
    def answer(self, task: TaskT, target: TargetT, outputs: list[Any], timings: GenerateTimings) -> DoneT:
        """The task's done event from its rows' outputs."""

    @staticmethod
    def dtype(target: TargetT) -> torch.dtype:
        """The dtype the keep factors multiply activations in."""
        model: torch.nn.Module = getattr(target, "model")  # noqa: B009 - every target holds its model
        return next(model.parameters()).dtype

    # The shared machinery --------------------------------------------------------------------------
    def run(self, tasks: Sequence[TaskT], reply: Callable[[list[tuple[TaskT, Any]]], None]) -> None:
        """Answer every task: one forward pass per model (in chunks of `max_rows` rows)."""
        by_model: dict[str, list[TaskT]] = {}
        for task in tasks:
            by_model.setdefault(task.model, []).append(task)
        for ref, group in by_model.items():
            self._run_model(ref, group, reply)

    def _table(self, ref: str, target: TargetT) -> MaskTable:
        table = self._tables.get(ref)
        if table is None or table.fingerprint != target.fingerprint:
            table = MaskTable(target.sites, target.fingerprint, target.device, self.mask_slots)
            self._tables[ref] = table
        return table

    def _run_model(
        self, ref: str, tasks: list[TaskT], reply: Callable[[list[tuple[TaskT, Any]]], None]
    ) -> None:
        try:
            target = self.target(ref)
            table = self._table(ref, target)
        except ConfigError as exc:  # a model of another kind
            reply([(t, failed("ModelKindMismatch", str(exc))) for t in tasks])
            return
        except Exception as exc:
            self._fail(tasks, exc, reply, what=f"model {ref!r} could not be loaded")
            return
        admitted_at = time.time()
        batch: list[_Prepared[TaskT]] = []
        in_use: set[str] = set()
        for task in tasks:
            if task.mask_id is not None and task.mask_id not in in_use and len(in_use) >= table.capacity:
                self._forward(
                    target, table, batch, reply, admitted_at
                )  # the table is full: run what it holds
                batch, in_use = [], set()
            try:
                slot = 0 if task.mask_id is None else mask_slot(table, task, self.load_mask, in_use)
                rows = self.prepare(task, target)
            except ServeError as exc:
                reply([(task, failed(exc.type, str(exc)))])
                continue
            except Exception as exc:  # a bug, or the device
                self._fail([task], exc, reply, what=f"{self.what} failed")
                continue
            if task.mask_id is not None:
                in_use.add(task.mask_id)
            batch.append(_Prepared(task, slot, rows))
        self._forward(target, table, batch, reply, admitted_at)

    def _forward(
        self,
        target: TargetT,
        table: MaskTable,
        batch: list[_Prepared[TaskT]],
        reply: Callable[[list[tuple[TaskT, Any]]], None],
        admitted_at: float,
    ) -> None:
        """Every row of `batch` through its mask, `max_rows` at a time; answer each task."""
        if not batch:
            return
        start = time.perf_counter()
        rows = [(p.slot, row) for p in batch for row in p.rows]
        try:
            outputs: list[Any] = []
            for begin in range(0, len(rows), self.max_rows):
                chunk = rows[begin : begin + self.max_rows]
                factors = table.factors([slot for slot, _ in chunk], self.dtype(target))
                items = [row for _, row in chunk]
                with torch.inference_mode():
                    if factors is None:  # nobody masked: no hooks at all
                        outputs += self.compute(target, items)
                    else:
                        with apply_row_masks(target.sites, factors):
                            outputs += self.compute(target, items)
        except Exception as exc:
            self._fail([p.task for p in batch], exc, reply, what=f"{self.what} failed")
            return
        model_ms = 1000 * (time.perf_counter() - start)
        events: list[tuple[TaskT, Any]] = []
        at = 0
        for prepared in batch:
            task, n = prepared.task, len(prepared.rows)
            timings = GenerateTimings(
                queue_ms=max(0.0, 1000 * (admitted_at - task.enqueued_at)),
                model_ms=model_ms,
                batch_rows=len(rows),
            )
            try:
                events.append((task, self.answer(task, target, outputs[at : at + n], timings)))
            except ServeError as exc:
                events.append((task, failed(exc.type, str(exc))))
            at += n
        reply(events)

    def _fail(
        self,
        tasks: list[TaskT],
        exc: Exception,
        reply: Callable[[list[tuple[TaskT, Any]]], None],
        *,
        what: str,
    ) -> None:
        """Answer `tasks` with `exc`; a device failure also stops serving (the worker restarts)."""
        outcome = classify(exc)
        if outcome is Outcome.out_of_memory:
            message = "out of device memory; retry with fewer inputs"
            reply([(t, failed("OutOfMemory", message)) for t in tasks])
            return
        if outcome is Outcome.rejected:  # a model that does not load (ModelLoadError, no hook sites)
            reply([(t, failed(type(exc).__name__, f"{what}: {exc}")) for t in tasks])
            return
        log.error("%s (%d requests)", what, len(tasks), exc_info=exc)
        reply([(t, failed("InternalError", f"{what}: {exc}")) for t in tasks])
        if outcome is Outcome.device_failure:
            raise WorkerFatalError(f"device failure: {what}: {exc}") from exc
