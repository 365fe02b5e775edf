"""OpenAI-compatible wire models: /v1/completions, /v1/chat/completions and /v1/models, in the shapes
OpenAI's API reference documents and its official clients send and parse.

Parameters we cannot honour are declared anyway with the values that mean "off" (`ACCEPTED`): a client
sending the default is served, one asking for more gets a 422 naming the field (`unsupported()`)
instead of having it silently ignored. Fields OpenAI does not know are rejected (extra="forbid").
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from protocol import ChatMessage, GenerateUsage, SamplingParams
from service.schemas import SEED_LIMIT, stop_list

FinishReason = Literal["stop", "length"]
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


# Requests ----------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool | None = Field(default=None, description="a last chunk with usage and no choices")


class OpenAIRequest(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")
    # Field -> the values meaning "off"; any other value is refused by unsupported().
    ACCEPTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "presence_penalty": (None, 0),
        "frequency_penalty": (None, 0),
        "logit_bias": (None, {}),
    }

    model: str = Field(min_length=1, max_length=400, description="a base model, or `<model>@<mask_id>`")
    temperature: float | None = Field(default=None, ge=0, le=2, description="default 1; 0 = greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, description="an extension (as in vLLM); 0 = off")
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

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
        "logprobs": (None,),
        "echo": (None, False),
        "best_of": (None, 1),
        "suffix": (None, ""),
    }

    prompt: str | list[str] = Field(description="one prompt, or several (each gets n completions)")
    max_tokens: int | None = Field(default=COMPLETION_MAX_TOKENS, ge=1)
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


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
    max_tokens: int | None = Field(
        default=None, ge=1, description="deprecated by OpenAI for max_completion_tokens"
    )
    max_completion_tokens: int | None = Field(default=None, ge=1)
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
    logprobs: None = None
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
