"""ServeEngine: runs a batch of generation requests on one model, each row through its own mask.

The serving loop (worker/serving.py) decides what shares a batch and carries replies over Redis; this
module does the model work and knows nothing of Redis. For each request it resolves the mask into the
model's device-resident MaskTable (fetching the bits on first use), renders and tokenizes the prompt,
and checks its length; a request that fails any of that is answered with an error event and left out
of the batch, so one bad request never fails its neighbours. The rest run as one `generate_rows` call
inside `apply_row_masks` with the per-row factors the table gathers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from selprune_core.errors import MaskMismatchError, SelPruneError
from selprune_core.generation import (
    Generation,
    GenerationRow,
    apply_chat_template,
    encode_prompts,
    generate_rows,
)
from selprune_core.loading import LoadedModel
from selprune_core.masks import NeuronMask, apply_row_masks
from worker.errors import (
    MaskNotFoundError,
    WorkerFatalError,
    is_cuda_oom,
    is_device_failure,
    release_cuda_cache,
)
from worker.mask_table import MaskTable
from worker.payloads import (
    ErrorInfo,
    GenerateChoice,
    GenerateDelta,
    GenerateDone,
    GenerateEvent,
    GenerateFailed,
    GenerateTask,
    GenerateTimings,
    GenerateUsage,
)
from worker.runtime import ModelRuntime

log = logging.getLogger(__name__)

Event = GenerateEvent  # delta | done | error
# Receives events in order; one call per decoding step while streaming, so the loop can send a step's
# events in one Redis round trip.
Reply = Callable[[list[tuple[GenerateTask, Event]]], None]
# Fetches a mask's bytes for a tenant; raises MaskNotFoundError when the tenant may not see it.
MaskLoader = Callable[[str, str], bytes]


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
    first_row: int = 0  # index of the request's first row in the batch


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

    def table(self, ref: str, loaded: LoadedModel) -> MaskTable:
        table = self._tables.get(ref)
        if table is None or table.fingerprint != loaded.fingerprint:
            device = next(loaded.model.parameters()).device
            table = MaskTable(loaded.sites, loaded.fingerprint, device, self.mask_slots)
            self._tables[ref] = table
        return table

    def run(self, tasks: Sequence[GenerateTask], reply: Reply) -> None:
        """Serve `tasks` (all on one model) as one batch; every task gets exactly one done/error event."""
        assert tasks and len({t.model for t in tasks}) == 1, "one batch serves one model"
        started = time.time()
        try:
            loaded = self.runtime.model(tasks[0].model)
        except SelPruneError as exc:
            reply([(t, failed("ModelLoadError", str(exc))) for t in tasks])
            return
        table = self.table(tasks[0].model, loaded)
        requests: list[_Request] = []
        for task in tasks:
            try:
                requests.append(self._prepare(task, loaded, table, {r.task.mask_id or "" for r in requests}))
            except ServeError as exc:
                reply([(task, failed(exc.type, str(exc)))])
        if not requests:
            return
        rows: list[GenerationRow] = []
        slots: list[int] = []
        owner: list[tuple[_Request, int]] = []  # batch row -> (request, choice index)
        for req in requests:
            req.first_row = len(rows)
            for index in range(req.task.rows):
                ids = req.prompt_ids[index // req.task.n]
                rows.append(GenerationRow(ids, req.task.sampling.to_config(index)))
                slots.append(req.slot)
                owner.append((req, index))

        def stream(pieces: list[tuple[int, str]]) -> None:
            events: list[tuple[GenerateTask, Event]] = [
                (owner[row][0].task, GenerateDelta(index=owner[row][1], text=text))
                for row, text in pieces
                if owner[row][0].task.stream
            ]
            if events:
                reply(events)

        model_start = time.perf_counter()
        try:
            generations = self._generate(loaded, table, rows, slots, stream)
        except Exception as exc:  # the batch is lost; its callers hear why
            if is_cuda_oom(exc):
                release_cuda_cache()
                log.warning("serving batch of %d rows ran out of device memory", len(rows))
                message = (
                    f"out of device memory on a batch of {len(rows)} rows; retry, or ask for fewer tokens"
                )
                reply([(r.task, failed("OutOfMemory", message)) for r in requests])
                return
            log.exception("serving batch of %d rows failed", len(rows))
            reply([(r.task, failed("InternalError", f"generation failed: {exc}")) for r in requests])
            if is_device_failure(exc):  # the device is suspect: stop serving so the worker restarts
                raise WorkerFatalError(f"device failure while serving: {exc}") from exc
            return
        model_ms = 1000 * (time.perf_counter() - model_start)
        reply([(r.task, self._done(r, generations, started, model_ms, len(rows))) for r in requests])

    # Steps --------------------------------------------------------------------------------------------
    def _prepare(
        self, task: GenerateTask, loaded: LoadedModel, table: MaskTable, in_batch: set[str]
    ) -> _Request:
        slot = 0 if task.mask_id is None else self._mask_slot(task, table, in_batch)
        tokenizer = loaded.tokenizer
        if task.messages is not None:
            text = apply_chat_template(tokenizer, [m.model_dump() for m in task.messages])
            prompt_ids = encode_prompts(tokenizer, [text], add_special_tokens=False)
        else:
            assert task.prompts is not None
            prompt_ids = encode_prompts(tokenizer, task.prompts)
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
        return _Request(task, slot, prompt_ids)

    def _mask_slot(self, task: GenerateTask, table: MaskTable, in_batch: set[str]) -> int:
        assert task.mask_id is not None
        slot = table.slot(task.mask_id)
        if slot is not None:
            return slot
        try:
            mask = NeuronMask.from_bytes(self.load_mask(task.mask_id, task.tenant))
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

    @torch.inference_mode()
    def _generate(
        self,
        loaded: LoadedModel,
        table: MaskTable,
        rows: list[GenerationRow],
        slots: list[int],
        stream: Callable[[list[tuple[int, str]]], None],
    ) -> list[Generation]:
        param = next(loaded.model.parameters())
        factors = table.factors(slots, param.dtype)
        if factors is None:  # nobody masked: no hooks at all
            return generate_rows(loaded.model, loaded.tokenizer, rows, on_text=stream)
        with apply_row_masks(loaded.sites, *factors):
            return generate_rows(loaded.model, loaded.tokenizer, rows, on_text=stream)

    @staticmethod
    def _done(
        req: _Request, generations: list[Generation], started: float, model_ms: float, batch_rows: int
    ) -> GenerateDone:
        mine = generations[req.first_row : req.first_row + req.task.rows]
        choices = [
            GenerateChoice(
                index=i,
                text=g.text,
                finish_reason=g.finish_reason,
                prompt_tokens=g.prompt_tokens,
                completion_tokens=g.completion_tokens,
            )
            for i, g in enumerate(mine)
        ]
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
                queue_ms=max(0.0, 1000 * (started - req.task.enqueued_at)),
                model_ms=model_ms,
                batch_rows=batch_rows,
            ),
        )
