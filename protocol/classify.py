"""The serving lane's image classification messages.

A classification request crosses as one ClassifyTask in the generation stream (keys.GENERATE_STREAM,
entry field "classify" instead of "task"), so the same serving workers read it, and the worker answers
on the request's reply list (keys.GENERATE_REPLY_KEY) with exactly one ClassifyDone or GenerateFailed.
Each image is one row: rows of different masks share one forward pass, as generation rows do.

Images cross as base64 text of a PNG or JPEG file, or of a NumPy `.npy` file holding one image
([H, W] or [C, H, W]; uint8 read as 0..255, floats as 0..1 intensities). The worker decodes them and
preprocesses them as the model expects (size, channels, normalisation).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from protocol.base import Strict
from protocol.constants import VIT_DIGITS_MODEL
from protocol.generate import GenerateFailed, GenerateTimings

MAX_IMAGES = 32  # images (rows) of one request (a tenant holds 32 rows in flight by default)
MAX_IMAGE_BYTES = 4 * 1024 * 1024  # one encoded image file
MAX_IMAGE_SIDE = 4096  # pixels along either side of a decoded image
MAX_TOP_K = 100  # labels returned per image
IMAGE_FORMATS = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"\x93NUMPY": "npy"}


def decode_image(text: str) -> tuple[bytes, str]:
    """The file bytes and format ("png", "jpeg" or "npy") of one base64 image (a `data:` URL prefix is
    allowed); ValueError saying what is wrong."""
    if text.startswith("data:"):
        _, comma, text = text.partition(",")
        if not comma:
            raise ValueError("a data: URL needs a comma before its base64 payload")
    if len(text) > 4 * (MAX_IMAGE_BYTES // 3 + 1):
        raise ValueError(f"the image is over {MAX_IMAGE_BYTES} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    for magic, name in IMAGE_FORMATS.items():
        if raw.startswith(magic):
            return raw, name
    raise ValueError("not a PNG, JPEG or .npy file")


class ClassifyTask(Strict):
    """Classify `images` with `model`, through `mask_id` when set; every image is one row."""

    stream_field: ClassVar[str] = "classify"  # the generation stream entry's field holding the task
    row_noun: ClassVar[str] = "images"

    schema_version: Literal[1] = 1
    request_id: str
    tenant: str
    model: str = VIT_DIGITS_MODEL
    mask_id: str | None = None
    images: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=MAX_IMAGES)
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    enqueued_at: float  # unix seconds, set by the gateway
    deadline: float  # unix seconds; past it the gateway has given up, so the worker skips the task

    @property
    def rows(self) -> int:
        return len(self.images)


class ClassLabel(Strict):
    id: int  # the class id (the model's output index)
    label: str  # the model's name for it (config id2label)
    probability: float  # softmax of the logits, through the mask


class ImagePrediction(Strict):
    labels: list[ClassLabel]  # the top_k classes, most probable first


class ClassifyDone(Strict):
    kind: Literal["classified"] = "classified"
    model: str
    mask_id: str | None
    predictions: list[ImagePrediction]  # one per image, in request order
    timings: GenerateTimings


ClassifyEvent = Annotated[ClassifyDone | GenerateFailed, Field(discriminator="kind")]
