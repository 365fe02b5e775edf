"""The serving lane's fill-mask messages: a masked LM's top tokens at each mask position of its inputs.

A fill-mask request crosses as one FillMaskTask in the generation stream (keys.GENERATE_STREAM, entry
field "fill_mask"), so the same serving workers read it, and the worker answers on the request's reply
list (keys.GENERATE_REPLY_KEY) with exactly one FillMaskDone or GenerateFailed. Each input is one row:
rows of different masks share one forward pass, as generation and classification rows do.

An input holds the model's mask token at least once; the literal `MASK_LITERAL` ("<mask>") is read as
the model's own mask token whatever it is (e.g. BERT's "[MASK]").
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from protocol.base import Strict
from protocol.constants import MLM_CODE_PROSE_MODEL
from protocol.generate import GenerateFailed, GenerateTimings

MASK_LITERAL = "<mask>"  # stands for the model's mask token in an input
MAX_FILL_INPUTS = 32  # inputs (rows) of one request
MAX_FILL_CHARS = 8_000  # characters of one input (the worker also checks its tokens against the model)
MAX_FILL_MASKS = 16  # mask tokens in one input
MAX_FILL_TOP_K = 100  # tokens returned per mask position


class FillMaskTask(Strict):
    """Fill the mask tokens of `inputs` with `model`, through `mask_id` when set; every input is one row."""

    stream_field: ClassVar[str] = "fill_mask"  # the generation stream entry's field holding the task
    row_noun: ClassVar[str] = "inputs"

    schema_version: Literal[1] = 1
    request_id: str
    tenant: str
    model: str = MLM_CODE_PROSE_MODEL
    mask_id: str | None = None
    inputs: list[Annotated[str, Field(min_length=1, max_length=MAX_FILL_CHARS)]] = Field(
        min_length=1, max_length=MAX_FILL_INPUTS
    )
    top_k: int = Field(default=5, ge=1, le=MAX_FILL_TOP_K)
    enqueued_at: float  # unix seconds, set by the gateway
    deadline: float  # unix seconds; past it the gateway has given up, so the worker skips the task

    @property
    def rows(self) -> int:
        return len(self.inputs)


class FilledToken(Strict):
    id: int  # the token id
    token: str  # the token decoded on its own (e.g. " the")
    probability: float  # softmax of the logits at the mask position, through the mask


class MaskFill(Strict):
    position: int  # the mask's token position in the tokenized input (special tokens counted)
    tokens: list[FilledToken]  # the top_k tokens, most probable first


class FilledInput(Strict):
    masks: list[MaskFill]  # one per mask token, in input order
    filled: str  # the input with every mask replaced by its most probable token


class FillMaskDone(Strict):
    kind: Literal["filled"] = "filled"
    model: str
    mask_id: str | None
    results: list[FilledInput]  # one per input, in request order
    timings: GenerateTimings


FillMaskEvent = Annotated[FillMaskDone | GenerateFailed, Field(discriminator="kind")]
