"""HTTP models of POST /v1/classify: the request (images as base64, an optional mask) and the response
(per image, the top-k classes and their probabilities), built on the wire contract (protocol/classify.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from protocol import ClassifyDone, ClassifyTask, ImagePrediction, Strict
from protocol.classify import MAX_IMAGES, MAX_TOP_K
from protocol.generate import GenerateTimings


class ClassifyRequest(Strict):
    """Classify images with an image classifier, through a mask when `mask_id` is set."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"images": ["<base64 PNG>"], "mask_id": "<a mask id>", "top_k": 3}]},
    )

    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="default: the mask's model, else builtin:vit-digits",
    )
    mask_id: str | None = Field(default=None, min_length=1, max_length=128)
    images: list[str] = Field(
        min_length=1,
        max_length=MAX_IMAGES,
        description="base64 PNG, JPEG or .npy ([H, W] or [C, H, W]; uint8 0..255, floats 0..1) files; a "
        "data: URL prefix is allowed. Resized, converted and normalised as the model expects",
    )
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K, description="classes returned per image")


class ClassifyResponse(BaseModel):
    """Per image (in request order), the most probable classes through the mask."""

    id: str
    model: str
    mask_id: str | None
    predictions: list[ImagePrediction]
    timings: GenerateTimings

    @classmethod
    def from_done(cls, task: ClassifyTask, done: ClassifyDone) -> ClassifyResponse:
        return cls(
            id=task.request_id,
            model=done.model,
            mask_id=done.mask_id,
            predictions=done.predictions,
            timings=done.timings,
        )
