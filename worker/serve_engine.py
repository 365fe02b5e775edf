"""ServeEngine: decodes generation requests on one model, each row through its own mask, with
requests joining and leaving a running batch (continuous batching).

The serving loop (worker/serving.py) decides what to admit and carries replies over Redis; this module
does the model work and knows nothing of Redis. Admitting a request resolves its mask into the model's
device-resident MaskTable (fetching the bits on first use), renders and tokenizes its prompt and checks
its length; a request that fails any of that (a chat template that raises included) is answered with an
error event and left out, so one bad request never fails its neighbours. The admitted rows are prefilled
together apart from the running `DecodeBatch` and merged into it only once that succeeded: a failing
admission fails only the new requests, never the rows already running. Every `step` then decodes one
token for every row inside `apply_row_masks` with the per-row factors the table gathers, and a request
is answered the moment its last row finishes; `cancel` drops the rows of requests nobody waits for.
Only a device failure (worker/errors.py `classify`) fails everything and stops the worker.
Models whose cache cannot take rows mid-flight (sliding windows) are admitted only into an empty batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase

from protocol import (
    ClassifyTask,
    ErrorInfo,
    FillMaskTask,
    GenerateDelta,
    GenerateDone,
    GenerateEvent,
    GenerateFailed,
    GenerateTask,
    GenerateTimings,
    GenerateUsage,
)
from selprune_core.decoding import DecodeBatch, Generation, GenerationRow, Piece
from selprune_core.errors import ConfigError, MaskMismatchError, SelPruneError
from selprune_core.generation import apply_chat_template, encode_prompts
from selprune_core.loading import LoadedModel
from selprune_core.masking import MaskFactors, apply_row_masks
from selprune_core.masks import NeuronMask
from worker.convert import generate_choice, sampling_config
from worker.errors import (
    MaskNotFoundError,
    Outcome,
    WorkerFatalError,
    classify,
)
from worker.mask_table import MaskTable
from worker.runtime import ModelRuntime

log = logging.getLogger(__name__)

Event = GenerateEvent  # delta | done | error
# Receives events in order; one call per decoding step while streaming, so the loop can send a step's
# events in one Redis round trip.
Reply = Callable[[list[tuple[GenerateTask, Event]]], None]
# Fetches a mask's bytes for a tenant; raises MaskNotFoundError when the tenant may not see it.
MaskLoader = Callable[[str, str], bytes]
MaskedTask = GenerateTask | ClassifyTask | FillMaskTask  # what names a mask: any serving lane request


class ServeError(Exception):
    """A request the engine cannot serve; `type` is the error type name the gateway maps to a status."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(message)
        self.type = type


@dataclass
class _Request:
    task: GenerateTask
    slot: int  # mask table slot; 0 = unmasked
    prompt_ids: list[list[int]]  # one list per prompt (a chat has one)
    rows: list[GenerationRow]  # one per choice: its prompt and its own sampling settings
    admitted_at: float = 0.0  # unix seconds
    model_start: float = 0.0  # perf_counter at admission
    batch_rows: int = 0  # rows in the batch right after admission
    done: dict[int, Generation] = field(default_factory=dict)  # choice index -> generation


@dataclass
class _Active:
    """The running batch: one model, its rows keyed (request id, choice index)."""

    ref: str
    loaded: LoadedModel
    table: MaskTable
    batch: DecodeBatch
    requests: dict[str, _Request]
    slots: dict[tuple[str, int], int]  # row key -> mask table slot
    # The keep factors of the rows' slots, in row order, and the slots they were gathered for: rows only
    # change on admission and when rows finish, so most steps reuse them instead of gathering again.
    factors: MaskFactors | None = None
    factor_slots: list[int] = field(default_factory=list)

    def row_factors(self, dtype: torch.dtype) -> MaskFactors | None:
        row_slots = [self.slots[_row_key(k)] for k in self.batch.keys]
        if row_slots != self.factor_slots:
            # A slot's bits cannot change while a running row uses it: admission protects the masks
            # in use from eviction (MaskTable.add's `keep`).
            self.factors, self.factor_slots = self.table.factors(row_slots, dtype), row_slots
        return self.factors


def failed(type: str, message: str) -> GenerateFailed:
    return GenerateFailed(error=ErrorInfo(type=type, message=message))


class ServeEngine:
    def __init__(
        self, runtime: ModelRuntime, load_mask: MaskLoader, *, mask_slots: int, max_prompt_tokens: int
    ) -> None:
        self.runtime = runtime
        self.load_mask = load_mask
        self.mask_slots = mask_slots
        self.max_prompt_tokens = max_prompt_tokens
        self._tables: dict[str, MaskTable] = {}  # model ref -> its masks on its device
        self._active: _Active | None = None

    def table(self, ref: str, loaded: LoadedModel) -> MaskTable:
        table = self._tables.get(ref)
        if table is None or table.fingerprint != loaded.fingerprint:
            # The input device: each layer's hook moves its rows' factors to its own device once.
            table = MaskTable(loaded.sites, loaded.fingerprint, loaded.device, self.mask_slots)
            self._tables[ref] = table
        return table

    # Batch ------------------------------------------------------------------------------------------
    @property
    def model(self) -> str | None:
        """The model of the running batch; None when idle."""
        active = self._active  # read once: other threads may look (tests, metrics)
        return active.ref if active is not None else None

    @property
    def rows(self) -> int:
        active = self._active
        return len(active.batch) if active is not None else 0

    @property
    def request_ids(self) -> list[str]:
        """The requests with rows in the running batch."""
        active = self._active
        return list(active.requests) if active is not None else []

    def can_admit(self, model: str) -> bool:
        """Whether requests for `model` may join now: the engine is idle, or runs that model with a cache
        that takes rows mid-flight."""
        active = self._active
        return active is None or (active.ref == model and active.batch.mergeable)

    def run(self, tasks: Sequence[GenerateTask], reply: Reply) -> None:
        """Serve `tasks` (one model) to the end as one batch: admit them all, step until done."""
        self.admit(tasks, reply)
        while self._active is not None:
            self.step(reply)

    def admit(self, tasks: Sequence[GenerateTask], reply: Reply) -> None:
        """Prefill `tasks` (all for one model `can_admit` allows) and merge them into the running batch.
        Every task gets exactly one done/error event, now or from a later `step`."""
        assert tasks and len({t.model for t in tasks}) == 1, "one admission serves one model"
        ref = tasks[0].model
        assert self.can_admit(ref), f"cannot admit {ref} now"
        try:
            loaded = self.runtime.model(ref)
            table = self.table(ref, loaded)
        except ConfigError as exc:  # an image classifier: it classifies, it does not generate
            reply([(t, failed("ModelKindMismatch", str(exc))) for t in tasks])
            return
        except Exception as exc:
            if classify(exc) is Outcome.device_failure:
                self._fail(list(tasks), exc, reply, running=False)
            log.warning(
                "model %s could not be loaded: %s", ref, exc, exc_info=not isinstance(exc, SelPruneError)
            )
            reply([(t, failed("ModelLoadError", f"model {ref!r} could not be loaded: {exc}")) for t in tasks])
            return
        active = self._active
        in_use = {r.task.mask_id or "" for r in active.requests.values()} if active is not None else set()
        requests: list[_Request] = []
        for i, task in enumerate(tasks):
            try:
                requests.append(self._prepare(task, loaded, table, in_use))
                in_use.add(task.mask_id or "")
            except ServeError as exc:
                reply([(task, failed(exc.type, str(exc)))])
            except Exception as exc:  # a bug or the device: still only this request, unless the device
                if classify(exc) is Outcome.device_failure:
                    self._fail([*(r.task for r in requests), *tasks[i:]], exc, reply, running=False)
                self._fail([task], exc, reply, running=False)
        if not requests:
            return
        keys = [(r.task.request_id, index) for r in requests for index in range(r.task.rows)]
        slots = {(r.task.request_id, index): r.slot for r in requests for index in range(r.task.rows)}
        admitted_at, model_start = time.time(), time.perf_counter()
        try:
            stream = [r.task.stream for r in requests for _ in range(r.task.rows)]
            rows = [row for r in requests for row in r.rows]
            batch = DecodeBatch(loaded.model, loaded.tokenizer, rows, keys, stream=stream)
            fresh = _Active(ref, loaded, table, batch, {r.task.request_id: r for r in requests}, slots)
            # Prefilled apart from the running batch and merged (all or nothing) only on success: a
            # failure here leaves the running rows untouched and fails only the new requests.
            pieces = self._forward(fresh, batch.prefill)
            if active is not None:
                active.batch.extend(batch)
        except Exception as exc:
            self._fail([r.task for r in requests], exc, reply, running=False)
            return
        if active is None:
            self._active = active = fresh
        else:
            active.requests.update(fresh.requests)
            active.slots.update(slots)
        for req in requests:
            req.admitted_at, req.model_start, req.batch_rows = admitted_at, model_start, len(active.batch)
        self._deliver(active, pieces, reply)

    def step(self, reply: Reply) -> None:
        """Decode one token for every row of the running batch; answer the requests that finish."""
        active = self._active
        assert active is not None, "nothing to step"
        try:
            pieces = self._forward(active, active.batch.step)
        except Exception as exc:
            self._fail([], exc, reply, running=True)
            return
        self._deliver(active, pieces, reply)

    def cancel(self, request_ids: Collection[str], reply: Reply) -> list[GenerateTask]:
        """Drop the running rows of these requests, whose callers went away (no event is sent for them);
        returns their tasks."""
        active = self._active
        gone = {rid for rid in request_ids if active is not None and rid in active.requests}
        if active is None or not gone:
            return []
        keys = {key for key in active.batch.keys if _row_key(key)[0] in gone}
        try:
            active.batch.drop(keys)
        except Exception as exc:  # the cache could not be cut: the batch cannot go on
            self._fail([], exc, reply, running=True)
            return []
        for key in keys:
            active.slots.pop(_row_key(key), None)
        tasks = [active.requests.pop(rid).task for rid in gone]
        if not len(active.batch):
            self._active = None
        return tasks

    def _forward(self, active: _Active, run: Callable[[], list[Piece]]) -> list[Piece]:
        """One forward of `active.batch` (prefill or step) through its rows' masks."""
        factors = active.row_factors(next(active.loaded.model.parameters()).dtype)
        with torch.inference_mode():
            if factors is None:  # nobody masked: no hooks at all
                return run()
            with apply_row_masks(active.loaded.sites, factors):
                return run()

    def _deliver(self, active: _Active, pieces: list[Piece], reply: Reply) -> None:
        """Send streamed text, then a done event for every request whose rows have all finished."""
        events: list[tuple[GenerateTask, Event]] = []
        for key, text in pieces:
            request_id, index = _row_key(key)
            req = active.requests[request_id]
            if req.task.stream:
                events.append((req.task, GenerateDelta(index=index, text=text)))
        for key, generation in active.batch.pop_finished():
            request_id, index = _row_key(key)
            active.slots.pop((request_id, index), None)
            req = active.requests[request_id]
            req.done[index] = generation
            if len(req.done) == req.task.rows:
                del active.requests[request_id]
                events.append((req.task, self._done(req, active.loaded.tokenizer)))
        if events:
            reply(events)
        if not len(active.batch):
            self._active = None

    def _fail(self, tasks: list[GenerateTask], exc: Exception, reply: Reply, *, running: bool) -> None:
        """Answer `tasks` with the error `exc`; with `running` (a step failed) the running batch's requests
        too, and the batch is dropped. A device failure fails everything and stops serving, so the worker
        restarts on a fresh device."""
        outcome = classify(exc)
        fatal = outcome is Outcome.device_failure
        if (running or fatal) and self._active is not None:
            tasks = [*tasks, *(r.task for r in self._active.requests.values())]
            self._active = None
        rows = sum(t.rows for t in tasks)
        if outcome is Outcome.out_of_memory:
            log.warning("serving %d rows ran out of device memory", rows)
            message = f"out of device memory on a batch of {rows} rows; retry, or ask for fewer tokens"
            reply([(t, failed("OutOfMemory", message)) for t in tasks])
            return
        log.error("serving %d rows failed", rows, exc_info=exc)
        reply([(t, failed("InternalError", f"generation failed: {exc}")) for t in tasks])
        if fatal:
            raise WorkerFatalError(f"device failure while serving: {exc}") from exc

    # Steps --------------------------------------------------------------------------------------------
    def _prepare(
        self, task: GenerateTask, loaded: LoadedModel, table: MaskTable, in_batch: set[str]
    ) -> _Request:
        slot = 0 if task.mask_id is None else mask_slot(table, task, self.load_mask, in_batch)
        tokenizer = loaded.tokenizer
        try:  # a chat template may refuse a conversation ("roles must alternate"): the caller's input
            if task.messages is not None:
                text = apply_chat_template(tokenizer, [m.model_dump() for m in task.messages])
                prompt_ids = encode_prompts(tokenizer, [text], add_special_tokens=False)
            elif task.prompt_ids is not None:
                prompt_ids = [list(ids) for ids in task.prompt_ids]
            else:
                prompt_ids = encode_prompts(tokenizer, task.prompts or [])
        except Exception as exc:
            what = "messages" if task.messages is not None else "prompt"
            message = f"the model's tokenizer or chat template refused the {what}: {exc}"
            raise ServeError(
                "InvalidMessages" if task.messages is not None else "InvalidPrompt", message
            ) from None
        embedding = cast(torch.Tensor, loaded.model.get_input_embeddings().weight)  # [vocab, hidden]
        vocab = int(embedding.shape[0])
        if (top := max(max(ids) for ids in prompt_ids)) >= vocab:
            raise ServeError(
                "InvalidPrompt", f"prompt token id {top} is outside the vocabulary (0..{vocab - 1})"
            )
        longest = max(len(ids) for ids in prompt_ids)
        if longest > self.max_prompt_tokens:
            raise ServeError(
                "PromptTooLong",
                f"prompt is {longest} tokens; this server accepts at most {self.max_prompt_tokens}",
            )
        context = getattr(loaded.model.config, "max_position_embeddings", None)
        if isinstance(context, int) and longest + task.sampling.max_new_tokens > context:
            raise ServeError(
                "PromptTooLong",
                f"prompt ({longest} tokens) + max_new_tokens ({task.sampling.max_new_tokens}) exceeds "
                f"the model's context of {context} tokens",
            )
        rows = [
            GenerationRow(prompt_ids[i // task.n], sampling_config(task.sampling, i))
            for i in range(task.rows)
        ]
        return _Request(task, slot, prompt_ids, rows)

    @staticmethod
    def _done(req: _Request, tokenizer: PreTrainedTokenizerBase) -> GenerateDone:
        mine = [req.done[i] for i in range(req.task.rows)]
        choices = [generate_choice(req.task, i, g, tokenizer) for i, g in enumerate(mine)]
        # Usage counts each distinct prompt once, as OpenAI does for n > 1.
        prompt_tokens = sum(len(ids) for ids in req.prompt_ids)
        completion_tokens = sum(g.completion_tokens for g in mine)
        return GenerateDone(
            model=req.task.model,
            mask_id=req.task.mask_id,
            choices=choices,
            usage=GenerateUsage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
            timings=GenerateTimings(
                queue_ms=max(0.0, 1000 * (req.admitted_at - req.task.enqueued_at)),
                model_ms=1000 * (time.perf_counter() - req.model_start),
                batch_rows=req.batch_rows,
            ),
        )


def mask_slot(table: MaskTable, task: MaskedTask, load_mask: MaskLoader, in_batch: Collection[str]) -> int:
    """The table slot of the task's mask, fetched for its tenant on first use without evicting the masks
    `in_batch` uses; ServeError MaskNotFound or MaskMismatch."""
    assert task.mask_id is not None
    slot = table.slot(task.mask_id)
    if slot is not None:
        return slot
    try:
        mask = NeuronMask.from_bytes(load_mask(task.mask_id, task.tenant))
        slot = table.add(mask, keep=in_batch)
    except MaskNotFoundError:
        raise ServeError("MaskNotFound", f"mask {task.mask_id!r} not found") from None
    except MaskMismatchError as exc:
        raise ServeError(
            "MaskMismatch", f"mask {task.mask_id!r} does not fit {task.model!r}: {exc}"
        ) from None
    if mask.mask_id != task.mask_id:
        raise ServeError("MaskMismatch", f"stored bits of {task.mask_id!r} hash to {mask.mask_id!r}")
    log.info("mask %s loaded for %s (%d masks on the device)", task.mask_id, task.model, len(table))
    return slot


def _row_key(key: Hashable) -> tuple[str, int]:
    """A batch row's key as the engine made it: (request id, choice index)."""
    return cast(tuple[str, int], key)
