"""OpenAI-compatible wire models: /v1/completions, /v1/chat/completions and /v1/models, in the shapes
OpenAI's API reference documents and its official clients send and parse.

Parameters we cannot honour are declared anyway with the values that mean "off" (`ACCEPTED`): a client
sending the default is served, one asking for more gets a 422 naming the field (`unsupported()`)
instead of having it silently ignored. Fields OpenAI does not know are rejected (extra="forbid").
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from protocol import ChatMessage, ChoiceLogprobs, GenerateUsage, SamplingParams
from protocol.base import reject_surrogates
from protocol.generate import MAX_LOGPROBS, MAX_NEW_TOKENS, MAX_ROWS, MAX_STOP_CHARS, MAX_TOP_K, SEED_LIMIT
from service.schemas import stop_list

FinishReason = Literal["stop", "length"]
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# Bounds are the serving contract's (protocol/generate.py), so a request that passes them always makes a
# valid task; the gateway's settings cap max_tokens and rows lower.
MaxTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
PromptField = str | list[str] | list[TokenId] | list[list[TokenId]]


# Requests ----------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool | None = Field(default=None, description="a last chunk with usage and no choices")


class OpenAIRequest(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # Field -> the values meaning "off"; any other value is refused by unsupported().
    ACCEPTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "presence_penalty": (None, 0),
        "frequency_penalty": (None, 0),
        "logit_bias": (None, {}),
    }

    model: str = Field(min_length=1, max_length=400, description="a base model, or `<model>@<mask_id>`")
    temperature: float | None = Field(default=None, ge=0, le=2, description="default 1; 0 = greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(
        default=None, ge=0, le=MAX_TOP_K, description="an extension (as in vLLM); 0 = off"
    )
    n: int | None = Field(default=None, ge=1, le=MAX_ROWS)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopText | list[StopText] | None = None
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # A lone surrogate (JSON "\ud800") has no UTF-8 form: refused here, naming the field, before it
        # could reach Redis or a response.
        return reject_surrogates(data)

    def unsupported(self) -> str | None:
        """A message naming the first parameter set to a value we cannot honour, else None."""
        for name, accepted in self.ACCEPTED.items():
            value = getattr(self, name)
            if value not in accepted:
                off = " or ".join(json.dumps(v) for v in accepted if v is not None)
                return f"{name} = {json.dumps(value)} is not supported; leave it unset" + (
                    f" or {off}" if off else ""
                )
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stops(self) -> list[str]:
        stops: list[str] = stop_list(self.stop)
        return stops

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=self.stops(),
        )


class CompletionRequest(OpenAIRequest):
    ACCEPTED = OpenAIRequest.ACCEPTED | {
        "best_of": (None, 1),
        "suffix": (None, ""),
    }

    prompt: PromptField = Field(
        description="one prompt, or several (each gets n completions); text, or token ids"
    )
    max_tokens: MaxTokens | None = COMPLETION_MAX_TOKENS
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="each token's log-probability and this many alternatives",
    )
    echo: bool | None = Field(default=None, description="return the prompt before the completion")
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: PromptField) -> PromptField:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list holds no prompt; send a string or a list of at least one")
        if isinstance(value, list) and any(isinstance(p, list) and not p for p in value):
            raise ValueError("a prompt of token ids needs at least one token")
        return value

    @model_validator(mode="after")
    def _logprobs_not_streamed(self) -> CompletionRequest:
        if self.stream and (self.logprobs is not None or self.echo):
            raise ValueError("logprobs and echo are not supported with stream; send stream: false")
        return self

    def prompts(self) -> list[str] | None:
        """The prompts as text, or None when they are token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, str) for p in self.prompt):
            return [str(p) for p in self.prompt]
        return None

    def prompt_ids(self) -> list[list[int]] | None:
        """The prompts as token ids (one list of ints is one prompt), or None when they are text."""
        if isinstance(self.prompt, str) or not all(isinstance(p, (int, list)) for p in self.prompt):
            return None
        if all(isinstance(p, int) for p in self.prompt):
            return [[int(p) for p in self.prompt if isinstance(p, int)]]
        return [list(p) for p in self.prompt if isinstance(p, list)]

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        return (
            super()
            .sampling(max_new_tokens)
            .model_copy(update={"logprobs": self.logprobs, "echo": bool(self.echo)})
        )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message as clients send it; other keys (e.g. an earlier reply's `refusal`) are ignored."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def to_chat(self) -> ChatMessage:
        content = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        )
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=content)


class ChatCompletionRequest(OpenAIRequest):
    ACCEPTED = OpenAIRequest.ACCEPTED | {
        "logprobs": (None, False),
        "top_logprobs": (None, 0),
        "tools": (None, []),
        "tool_choice": (None, "none", "auto"),
        "response_format": (None, {"type": "text"}),
        "store": (None, False),
    }

    messages: list[Message] = Field(min_length=1)
    max_tokens: MaxTokens | None = Field(
        default=None, description="deprecated by OpenAI for max_completion_tokens"
    )
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    def chat(self) -> list[ChatMessage]:
        return [m.to_chat() for m in self.messages]


# Responses ---------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: GenerateUsage) -> Usage:
        return cls.model_validate(usage.model_dump())


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """A completion, and (with finish_reason null until the last) each chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _set_fields_only(self) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: {"role", "content": ""} first, {"content"} after, {} last.
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str = Field(description="a base model, or `<model>@<mask_id>` for a mask on it")
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
