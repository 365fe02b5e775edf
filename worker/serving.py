"""ServeLoop: the serving lane. Pulls generation requests from Redis in batches and answers each.

Contract (key names in protocol/keys.py; the gateway's side is service/serving_client.py):

    request   XADD GENERATE_STREAM {"task": GenerateTask JSON}; read by the group GENERATE_GROUP
    reply     RPUSH GENERATE_REPLY_KEY <GenerateEvent JSON> (EXPIRE GENERATE_REPLY_TTL_S on every push):
              `delta` events while streaming, then exactly one `done` or `error`
    presence  SET SERVER_HEARTBEAT_KEY {"worker_id", "models", "at"} PX (TTL), refreshed every loop
    stats     LPUSH GENERATE_BATCH_SECONDS_KEY / GENERATE_BATCH_ROWS_KEY, one value per turn, sent at most
              once a second (trimmed), for /metrics
    cancel    ZMSCORE GENERATE_CANCELLED_KEY <running and pending request ids>, at most every
              CANCEL_CHECK_S: the rows of a request whose caller went away leave the batch unanswered

Continuous batching. Each turn reads what is waiting (up to serve_max_batch + serve_max_pending rows,
counting the running batch and what is already pending), admits what may join the running batch, and
decodes one token for every running row; a request is answered the moment its rows finish, and a
newcomer joins at the next turn instead of waiting for the batch to end. Idle, the first arrival waits
serve_batch_window_ms once for batch-mates. Admission is round robin across tenants (see
`_fair_order`): each tenant's requests in arrival order, the tenant served longest ago first, so one
tenant's burst never delays another tenant's next request beyond the first turn with room for it. The
first request in that order picks the model, and a request for another model waits for the running
batch to drain rather than be overtaken; a request with more rows than there is room for is not
overtaken either.

Image classification (`ClassifyTask`, entry field "classify" instead of "task") and fill-mask
(`FillMaskTask`, field "fill_mask") share the stream and the loop: each is one forward pass, so the tasks
read in a turn are answered in that turn (worker/classify_engine.py, worker/fill_mask_engine.py, both
worker/row_engine.py's machinery), rows of different masks in one batch, before the turn's decode step.

Requests are acked and deleted as they are read: generation is short and latency-bound, so a request
whose worker dies is answered 504 by the gateway rather than retried after a visibility timeout. A
request past its deadline when read or admitted is dropped (the gateway has already answered 504). On
stop, the running batch is decoded to its end before the loop exits. One request's failure (a task
that does not validate, a chat template that raises, a prefill that fails) is that request's error
event; only a device failure stops the loop (worker/serve_engine.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import redis
from pydantic import BaseModel, ValidationError

from protocol import ClassifyTask, FillMaskTask, GenerateTask, keys
from worker.classify_engine import ClassifyEngine
from worker.fill_mask_engine import FillMaskEngine
from worker.loop import ensure_group, require_bytes_client, run_turns
from worker.runtime import ModelRuntime
from worker.serve_engine import ServeEngine, failed
from worker.settings import WorkerSettings
from worker.store import MaskStore

log = logging.getLogger(__name__)

CANCEL_CHECK_S = 0.1  # how often (at most) the loop asks Redis which of its requests were cancelled
_SERVED_KEPT = 10_000  # tenants whose last admission is remembered for the round robin
_REQUEST_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")  # what a gateway's request id looks like
Task = TypeVar("Task", GenerateTask, ClassifyTask, FillMaskTask)
OneShot = ClassifyTask | FillMaskTask  # one forward pass each: answered in the turn they are read


def ensure_serve_group(redis_client: redis.Redis) -> None:
    ensure_group(redis_client, keys.GENERATE_STREAM, keys.GENERATE_GROUP)


class ServeLoop:
    def __init__(self, settings: WorkerSettings, redis_client: redis.Redis, runtime: ModelRuntime) -> None:
        require_bytes_client(redis_client, "serving loop")
        self.settings = settings
        self.redis = redis_client
        self.runtime = runtime
        self.id = settings.worker_id
        store = MaskStore(redis_client)
        self.engine = ServeEngine(
            runtime,
            store.get_bytes,
            mask_slots=max(settings.serve_mask_cache, settings.serve_max_batch),
            max_prompt_tokens=settings.max_prompt_tokens,
        )
        slots = max(settings.serve_mask_cache, settings.serve_max_batch)
        self.classifier = ClassifyEngine(runtime, store.get_bytes, mask_slots=slots)
        self.filler = FillMaskEngine(runtime, store.get_bytes, mask_slots=slots)
        self.pending: list[GenerateTask] = []  # read, not yet admitted; oldest first
        self.one_shot_pending: list[OneShot] = []  # read this turn, answered before its decode step
        self._served: dict[str, int] = {}  # tenant -> number of its latest admission (round robin)
        self._admissions = itertools.count()
        self.cancel_every_s = CANCEL_CHECK_S
        self._cancel_checked = float("-inf")
        self._turn_stats: list[tuple[float, int]] = []  # (seconds, rows) per turn, not yet in Redis
        self._stats_sent_at = 0.0
        self._beat_key = keys.SERVER_HEARTBEAT_KEY.format(worker_id=self.id)
        self._beat_ttl_ms = int(1000 * max(30.0, 3 * settings.poll_block_ms / 1000))

    # Loop -------------------------------------------------------------------------------------------
    def run(self, stop_event: threading.Event | None = None) -> None:
        """Serve until `stop_event` is set (checked between batches)."""
        stop = stop_event or threading.Event()
        ensure_serve_group(self.redis)
        log.info("server %s: waiting for generation requests on %s", self.id, keys.GENERATE_STREAM)

        last_beat = 0.0

        def turn() -> bool:
            nonlocal last_beat
            if time.monotonic() - last_beat >= 1.0:  # not every decode step: one round trip a second
                self.beat()
                self._send_stats()
                last_beat = time.monotonic()
            self.turn()
            return True

        try:
            run_turns(
                f"server {self.id}",
                stop,
                turn,
                ensure_group=lambda: ensure_serve_group(self.redis),
                redis_client=self.redis,
                heartbeat_key=self._beat_key,
            )
        finally:
            if self.engine.model is not None:  # requests in flight are answered before we go
                log.info("server %s: finishing %d running rows", self.id, self.engine.rows)
                try:
                    self.finish()
                except redis.RedisError:
                    log.warning("server %s: Redis gone; in-flight requests will time out", self.id)
        log.info("server %s: stopped", self.id)

    def turn(self) -> int:
        """Read what is waiting, admit what may join the running batch, decode one step.

        Returns the number of requests admitted. Idle, the read blocks (poll_block_ms) and, once a
        request arrives, waits serve_batch_window_ms once for batch-mates; while a batch runs, reads do
        not block, so decoding never waits on an empty stream.
        """
        engine = self.engine
        self._drop_cancelled()
        if (room := self._room()) > 0:
            idle = engine.model is None and not self.pending and not self.one_shot_pending
            self._read(room, block_ms=self.settings.poll_block_ms if idle else None)
            room = self._room()
            waiting = self.pending or self.one_shot_pending
            if engine.model is None and waiting and room > 0 and self.settings.serve_batch_window_ms > 0:
                time.sleep(self.settings.serve_batch_window_ms / 1000)
                self._read(room, block_ms=None)
        classified = self._one_shot()
        admitted = self._admissible()
        if not admitted and engine.model is None:
            return classified
        start = time.perf_counter()
        if admitted:
            engine.admit(admitted, self._send)
        if engine.model is not None:
            engine.step(self._send)
        self._record(time.perf_counter() - start, engine.rows)
        return classified + len(admitted)

    def finish(self) -> None:
        """Decode the running batch to its end, admitting nothing new (shutdown, tests)."""
        while self.engine.model is not None:
            self.engine.step(self._send)
        self._send_stats()
        self.beat()

    def beat(self) -> None:
        info = {"worker_id": self.id, "models": self.runtime.loaded_models(), "at": time.time()}
        self.redis.set(self._beat_key, json.dumps(info), px=self._beat_ttl_ms)

    # Requests ---------------------------------------------------------------------------------------
    def _room(self) -> int:
        """Rows still to read: a batch's worth, and serve_max_pending more to choose fairly among."""
        held = self.engine.rows + sum(t.rows for t in self.pending)
        return self.settings.serve_max_batch + self.settings.serve_max_pending - held

    def _drop_cancelled(self) -> None:
        """Drop the requests whose callers went away: their running rows leave the batch, pending ones
        are never admitted. Nobody reads their replies, so none is sent."""
        ids = [*self.engine.request_ids, *(t.request_id for t in self.pending)]
        if not ids or time.monotonic() - self._cancel_checked < self.cancel_every_s:
            return
        self._cancel_checked = time.monotonic()
        scores = self.redis.zmscore(keys.GENERATE_CANCELLED_KEY, ids)
        gone = {rid for rid, score in zip(ids, scores, strict=True) if score is not None}
        if gone:
            dropped = self.engine.cancel(gone, self._send)
            self.pending = [t for t in self.pending if t.request_id not in gone]
            log.info("cancelled %d request(s), %d of them running", len(gone), len(dropped))

    def _read(self, count: int, block_ms: int | None) -> None:
        """Move up to `count` waiting requests into `pending`, acking and deleting their entries."""
        reply: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None = self.redis.xreadgroup(  # type: ignore[assignment]
            keys.GENERATE_GROUP, self.id, {keys.GENERATE_STREAM: ">"}, count=count, block=block_ms
        )
        entries = [(entry_id, fields) for _stream, items in reply or [] for entry_id, fields in items]
        if not entries:
            return
        ids = [entry_id for entry_id, _ in entries]
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(keys.GENERATE_STREAM, keys.GENERATE_GROUP, *ids)
            pipe.xdel(keys.GENERATE_STREAM, *ids)
            pipe.execute()
        now = time.time()
        for _entry_id, fields in entries:
            task: GenerateTask | OneShot | None
            if b"classify" in fields:
                task = self._parse(fields[b"classify"], ClassifyTask)
            elif b"fill_mask" in fields:
                task = self._parse(fields[b"fill_mask"], FillMaskTask)
            else:
                task = self._parse(fields.get(b"task", b""), GenerateTask)
            if task is None:
                continue
            if task.deadline <= now:
                log.info("request %s: past its deadline when read; dropped", task.request_id)
                continue
            if isinstance(task, ClassifyTask | FillMaskTask):
                self.one_shot_pending.append(task)
            else:
                self.pending.append(task)

    def _one_shot(self) -> int:
        """Answer the classification and fill-mask tasks read this turn (one forward per model and
        kind); returns how many."""
        now, tasks = time.time(), self.one_shot_pending
        self.one_shot_pending = []
        tasks = [t for t in tasks if t.deadline > now]  # the gateway answered the others 504 already
        if tasks:
            start = time.perf_counter()
            self.classifier.run([t for t in tasks if isinstance(t, ClassifyTask)], self._send)
            self.filler.run([t for t in tasks if isinstance(t, FillMaskTask)], self._send)
            self._record(time.perf_counter() - start, sum(t.rows for t in tasks))
        return len(tasks)

    def _parse(self, raw: bytes, kind: type[Task]) -> Task | None:
        try:
            return kind.model_validate_json(raw)
        except ValidationError as exc:
            # Answer if the request id can be read, so the caller hears why instead of timing out. The
            # message names fields, never their values (which may not even be valid text).
            request_id = _request_id(raw)
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'task'}: {e['msg']}" for e in exc.errors()
            )
            log.warning("request %s: invalid task: %s", request_id or "<unknown>", problems)
            if request_id:
                names: dict[type, str] = {ClassifyTask: "classification", FillMaskTask: "fill-mask"}
                what = names.get(kind, "generation")
                self._push(request_id, failed("InvalidRequest", f"invalid {what} task: {problems}"))
            return None

    def _admissible(self) -> list[GenerateTask]:
        """Pending requests that may join the running batch now, in fair order (`_fair_order`).

        Admission stops at the first request that cannot join (another model, or no room), so a burst on
        one model never overtakes an earlier request for another, nor small requests a large one; the
        running batch drains and a later turn starts that model. A request with more rows than a batch
        holds runs alone, once the engine is idle.
        """
        engine, cap, now = self.engine, self.settings.serve_max_batch, time.time()
        for task in self.pending:
            if task.deadline <= now:  # waited out its deadline here: the gateway has answered 504
                log.info("request %s: past its deadline before admission; dropped", task.request_id)
        self.pending = [t for t in self.pending if t.deadline > now]
        admitted: list[GenerateTask] = []
        rows, model = engine.rows, engine.model
        for task in self._fair_order():
            model = model or task.model
            if task.model != model or not engine.can_admit(model):
                break
            if rows + task.rows > cap and (rows > 0 or admitted):
                break
            admitted.append(task)
            rows += task.rows
        if admitted:
            taken = {id(t) for t in admitted}
            self.pending = [t for t in self.pending if id(t) not in taken]
            for task in admitted:
                self._served[task.tenant] = next(self._admissions)
            if len(self._served) > _SERVED_KEPT:  # forget the tenants served longest ago
                newest = sorted(self._served.items(), key=lambda item: item[1])[-_SERVED_KEPT // 2 :]
                self._served = dict(newest)
        return admitted

    def _fair_order(self) -> list[GenerateTask]:
        """Pending requests, round robin across tenants: the first request of every tenant, then the
        second of every tenant, and so on; tenants served longest ago (or never) first, ties in order of
        arrival. With tenant A saturating the lane, B's request is the next one admitted."""
        queues: dict[str, list[GenerateTask]] = {}
        for task in self.pending:
            queues.setdefault(task.tenant, []).append(task)
        tenants = sorted(queues, key=lambda tenant: self._served.get(tenant, -1))  # stable: arrival order
        depth = max((len(q) for q in queues.values()), default=0)
        return [queues[t][i] for i in range(depth) for t in tenants if i < len(queues[t])]

    def _record(self, seconds: float, rows: int) -> None:
        """Time of one turn in the model (admission prefill and/or a decode step) and the rows still
        running after it, for /metrics. Kept here and sent at most once a second: a turn is one decode
        step, and a Redis round trip per step would sit on the hot path."""
        self._turn_stats.append((seconds, rows))
        if time.monotonic() - self._stats_sent_at >= 1.0:
            self._send_stats()

    def _send_stats(self) -> None:
        if self._turn_stats:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.lpush(keys.GENERATE_BATCH_SECONDS_KEY, *(f"{s:.4f}" for s, _ in self._turn_stats))
                pipe.ltrim(keys.GENERATE_BATCH_SECONDS_KEY, 0, keys.DURATIONS_KEPT - 1)
                pipe.lpush(keys.GENERATE_BATCH_ROWS_KEY, *(str(r) for _, r in self._turn_stats))
                pipe.ltrim(keys.GENERATE_BATCH_ROWS_KEY, 0, keys.DURATIONS_KEPT - 1)
                pipe.execute()
            self._turn_stats.clear()
        self._stats_sent_at = time.monotonic()

    # Replies ----------------------------------------------------------------------------------------
    def _send(self, events: Sequence[tuple[GenerateTask | OneShot, BaseModel]]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for task, event in events:
                self._queue_push(pipe, task.request_id, event)
            pipe.execute()

    def _push(self, request_id: str, event: BaseModel) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            self._queue_push(pipe, request_id, event)
            pipe.execute()

    @staticmethod
    def _queue_push(pipe: Any, request_id: str, event: BaseModel) -> None:
        key = keys.GENERATE_REPLY_KEY.format(request_id=request_id)
        pipe.rpush(key, event.model_dump_json())
        pipe.expire(key, keys.GENERATE_REPLY_TTL_S)


def _request_id(raw: bytes) -> str | None:
    try:
        value = json.loads(raw).get("request_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and _REQUEST_ID.fullmatch(value) else None
