"""The serving lane's messages.

A generation request crosses as one GenerateTask (stream entry field "task"); the worker answers on
the request's reply list (keys.GENERATE_REPLY_KEY) with GenerateEvent items: deltas when streaming,
then exactly one `done` or `error`. Caps (prompt size, max_new_tokens, rows) are the gateway's job;
the worker re-checks what only it can measure (prompt tokens, the model's context length).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from protocol.base import ErrorInfo, Strict
from protocol.constants import EMBEDDED_MODEL

# What a worker can execute, whatever a gateway's settings allow: every number below becomes a torch
# tensor or a Python loop bound on the worker, so none may be unbounded. The gateway caps lower.
MAX_NEW_TOKENS = 1_000_000  # the model's context bounds it further (the worker answers PromptTooLong)
MAX_TOP_K = 1_000_000  # above any vocabulary, where top-k is off anyway; far inside int64
SEED_LIMIT = 2**63  # row seeds (seed + row) stay within what torch.Generator.manual_seed takes
MAX_ROWS = 1024  # rows of one request (prompts x n); also caps n and the number of prompts
MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 256  # characters of one stop string (a streamed row holds back that many)
MAX_LOGPROBS = 20  # top alternatives per token, OpenAI's cap for `logprobs` on completions


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingParams(Strict):
    """Decoding settings of one request; every row of the request uses them."""

    model_config = ConfigDict(allow_inf_nan=False)

    max_new_tokens: int = Field(default=64, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="1 = off")
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K, description="0 = off")
    seed: int | None = Field(
        default=None, ge=0, lt=SEED_LIMIT, description="row i samples with seed + i; None = random"
    )
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOP
    )
    ignore_eos: bool = Field(default=False, description="keep generating past EOS (for benchmarks)")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="each token's log-probability and this many alternatives",
    )
    echo: bool = Field(
        default=False, description="the prompt comes back before the completion (with logprobs)"
    )


class GenerateTask(Strict):
    """One generation request for the serving lane: len(prompts) x n rows (or n rows for a chat),
    all on one model and one mask. Row i = prompt i // n, sample i % n; choice index = row index."""

    schema_version: Literal[1] = 1
    request_id: str
    tenant: str
    model: str = EMBEDDED_MODEL
    mask_id: str | None = None
    # Raw text, tokenized with the tokenizer's special tokens.
    prompts: list[str] | None = Field(default=None, max_length=MAX_ROWS)
    # Or prompts as token ids, used as given (the worker checks them against the vocabulary).
    prompt_ids: list[list[Annotated[int, Field(ge=0)]]] | None = Field(default=None, max_length=MAX_ROWS)
    messages: list[ChatMessage] | None = None  # rendered with the model's chat template
    n: int = Field(default=1, ge=1, le=MAX_ROWS)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    stream: bool = False  # send `delta` events as text is produced
    enqueued_at: float  # unix seconds, set by the gateway
    deadline: float  # unix seconds; past it the gateway has given up, so the worker skips the task

    @model_validator(mode="after")
    def _one_input(self) -> GenerateTask:
        if sum(x is not None for x in (self.prompts, self.prompt_ids, self.messages)) != 1:
            raise ValueError("exactly one of prompts, prompt_ids and messages must be given")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts must not be empty")
        if self.prompt_ids is not None and not all(self.prompt_ids):
            raise ValueError("prompt_ids must hold at least one prompt, each of at least one token")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        if self.rows > MAX_ROWS:
            raise ValueError(f"the task asks for {self.rows} rows (prompts x n); the limit is {MAX_ROWS}")
        return self

    @property
    def rows(self) -> int:
        prompts = self.prompts if self.prompts is not None else self.prompt_ids
        return (len(prompts) if prompts is not None else 1) * self.n


class GenerateDelta(Strict):
    kind: Literal["delta"] = "delta"
    index: int  # the choice (row) this text extends
    text: str


class ChoiceLogprobs(Strict):
    """Per token of a choice (the prompt's first, with echo): OpenAI's `logprobs` object of completions."""

    tokens: list[str]  # each token decoded alone
    token_logprobs: list[float | None]  # None for the prompt's first token
    top_logprobs: list[dict[str, float] | None]  # the most likely tokens at each position
    text_offset: list[int]  # where each token starts in the choice's text


class GenerateChoice(Strict):
    index: int
    text: str  # cut before the first stop string; with echo, the prompt first
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    logprobs: ChoiceLogprobs | None = None


class GenerateUsage(Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateTimings(Strict):
    queue_ms: float  # enqueued_at -> the batch holding this request started
    model_ms: float  # time the batch spent in the model (prefill + decoding + sampling)
    batch_rows: int  # rows in that batch, this request's and others'


class GenerateDone(Strict):
    kind: Literal["done"] = "done"
    model: str
    mask_id: str | None
    choices: list[GenerateChoice]
    usage: GenerateUsage
    timings: GenerateTimings


class GenerateFailed(Strict):
    kind: Literal["error"] = "error"
    error: ErrorInfo


GenerateEvent = Annotated[GenerateDelta | GenerateDone | GenerateFailed, Field(discriminator="kind")]
