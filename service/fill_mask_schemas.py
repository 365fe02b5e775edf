"""HTTP models of POST /v1/fill-mask: the request (texts holding "<mask>", an optional mask) and the
response (per input, per mask position, the top-k tokens and the filled text), built on the wire
contract (protocol/fill_mask.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from protocol import FilledInput, FillMaskDone, FillMaskTask, Strict
from protocol.fill_mask import MAX_FILL_CHARS, MAX_FILL_INPUTS, MAX_FILL_TOP_K
from protocol.generate import GenerateTimings


class FillMaskRequest(Strict):
    """Fill the mask tokens of texts with a masked LM, through a mask when `mask_id` is set."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": ["def add(a, b):\n    return a <mask> b"], "mask_id": "<a mask id>", "top_k": 5}
            ]
        },
    )

    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="default: the mask's model, else builtin:mlm-code-prose",
    )
    mask_id: str | None = Field(default=None, min_length=1, max_length=128)
    inputs: list[Annotated[str, Field(min_length=1, max_length=MAX_FILL_CHARS)]] = Field(
        min_length=1,
        max_length=MAX_FILL_INPUTS,
        description='texts each holding the model\'s mask token at least once; "<mask>" stands for it',
    )
    top_k: int = Field(default=5, ge=1, le=MAX_FILL_TOP_K, description="tokens returned per mask position")


class FillMaskResponse(BaseModel):
    """Per input (in request order), the most probable tokens at each of its mask positions."""

    id: str
    model: str
    mask_id: str | None
    results: list[FilledInput]
    timings: GenerateTimings

    @classmethod
    def from_done(cls, task: FillMaskTask, done: FillMaskDone) -> FillMaskResponse:
        return cls(
            id=task.request_id,
            model=done.model,
            mask_id=done.mask_id,
            results=done.results,
            timings=done.timings,
        )
