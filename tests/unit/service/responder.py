"""A stand-in serving worker for gateway tests: it reads the generate stream with XREADGROUP, as the
real one does, and answers each task with the GenerateEvent JSON a handler returns (default: echo), and
each classification task with the event `classify_handler` returns (default: class 0, probability 1)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import redis

from protocol import (
    ClassifyDone,
    ClassifyTask,
    ClassLabel,
    GenerateChoice,
    GenerateDelta,
    GenerateDone,
    GenerateEvent,
    GenerateFailed,
    GenerateTask,
    GenerateTimings,
    GenerateUsage,
    ImagePrediction,
    keys,
)

Event = GenerateEvent  # delta | done | error
Handler = Callable[[GenerateTask], list[Event]]
ClassifyHandler = Callable[[ClassifyTask], ClassifyDone | GenerateFailed]


def first_class(task: ClassifyTask) -> ClassifyDone:
    """Every image: class 0 with probability 1."""
    labels = [ClassLabel(id=0, label="0", probability=1.0)]
    return ClassifyDone(
        model=task.model,
        mask_id=task.mask_id,
        predictions=[ImagePrediction(labels=labels) for _ in task.images],
        timings=GenerateTimings(queue_ms=1.0, model_ms=2.0, batch_rows=task.rows),
    )


def echo_texts(task: GenerateTask) -> list[str]:
    """Row i's text: the row index and its prompt (or the last chat message)."""
    sources = task.prompts or [task.messages[-1].content if task.messages else ""]
    return [f" echo {i}: {sources[i // task.n]}" for i in range(task.rows)]


def done_for(task: GenerateTask, texts: list[str], finish_reason: str = "length") -> GenerateDone:
    choices = [
        GenerateChoice(
            index=i, text=t, finish_reason=finish_reason, prompt_tokens=3, completion_tokens=len(t.split())
        )
        for i, t in enumerate(texts)
    ]
    prompt, completion = 3 * len(choices), sum(c.completion_tokens for c in choices)
    return GenerateDone(
        model=task.model,
        mask_id=task.mask_id,
        choices=choices,
        usage=GenerateUsage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        ),
        timings=GenerateTimings(queue_ms=1.5, model_ms=20.0, batch_rows=task.rows),
    )


def echo(task: GenerateTask) -> list[Event]:
    """Deltas (two per row, when streaming), then `done` with the whole texts."""
    texts = echo_texts(task)
    events: list[Event] = []
    if task.stream:
        for i, text in enumerate(texts):
            half = len(text) // 2
            events += [GenerateDelta(index=i, text=text[:half]), GenerateDelta(index=i, text=text[half:])]
    return [*events, done_for(task, texts)]


class Responder:
    """Runs in a thread from `with Responder(url) as r:`; `tasks` holds what it read, in order."""

    def __init__(
        self, redis_url: str, handler: Handler = echo, classify_handler: ClassifyHandler = first_class
    ) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.handler = handler
        self.classify_handler = classify_handler
        self.tasks: list[GenerateTask] = []
        self.classified: list[ClassifyTask] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="responder", daemon=True)

    def __enter__(self) -> Responder:
        try:
            self.redis.xgroup_create(keys.GENERATE_STREAM, keys.GENERATE_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.redis.close()
        assert not self._thread.is_alive(), "the responder did not stop"
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                streams = self.redis.xreadgroup(
                    keys.GENERATE_GROUP, "responder", {keys.GENERATE_STREAM: ">"}, count=8, block=20
                )
                for _, entries in streams or []:
                    for entry_id, fields in entries:
                        if b"classify" in fields:
                            self._classify(ClassifyTask.model_validate_json(fields[b"classify"]))
                        else:
                            self._answer(GenerateTask.model_validate_json(fields[b"task"]))
                        self.redis.xack(keys.GENERATE_STREAM, keys.GENERATE_GROUP, entry_id)
                        self.redis.xdel(keys.GENERATE_STREAM, entry_id)
        except BaseException as exc:  # raised again by __exit__
            self.error = exc

    def _answer(self, task: GenerateTask) -> None:
        self.tasks.append(task)
        reply = keys.GENERATE_REPLY_KEY.format(request_id=task.request_id)
        for event in self.handler(task):
            self.redis.rpush(reply, event.model_dump_json())
            self.redis.expire(reply, keys.GENERATE_REPLY_TTL_S)

    def _classify(self, task: ClassifyTask) -> None:
        self.classified.append(task)
        reply = keys.GENERATE_REPLY_KEY.format(request_id=task.request_id)
        self.redis.rpush(reply, self.classify_handler(task).model_dump_json())
        self.redis.expire(reply, keys.GENERATE_REPLY_TTL_S)
