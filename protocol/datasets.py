"""Dataset references as they cross the wire: inline texts, a file under the data root, a hub
dataset, a built-in corpus, or labelled images. The worker turns them into the core's references
(worker/convert.py, worker/image_data.py).

A job reads texts or images, never both: `data_kind` says which a list of references holds, and
`check_data_kind` refuses a mix, and a built-in model of the other kind, with a message naming both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, model_validator

from protocol.base import Strict
from protocol.constants import EMBEDDED_MODEL, IMAGE_MODELS, MASKED_LM_MODELS, MAX_CLASS_ID

DataKind = Literal["text", "images"]


class InlineData(Strict):
    kind: Literal["inline"] = "inline"
    texts: list[str] = Field(min_length=1, description="the texts themselves")


class FileData(Strict):
    kind: Literal["file"] = "file"
    path: str = Field(min_length=1, description="path relative to the configured data root")
    text_field: str = "text"
    filter: str | None = Field(default=None, description='e.g. "toxicity >= 0.8"')


class HubData(Strict):
    kind: Literal["hub"] = "hub"
    id: str = Field(min_length=1)
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    filter: str | None = None


class BuiltinData(Strict):
    kind: Literal["builtin"] = "builtin"
    name: str = Field(
        description="python_code, english_prose, toxic, toxic_prompts, or (generated per model by the worker) "
        "toxic_continuations, clean_continuations"
    )


ClassId = Annotated[int, Field(strict=True, ge=0, le=MAX_CLASS_ID)]


class ImageData(Strict):
    """Labelled images for an image classifier, split train / held-out by class (stratified, fixed seed).

    `labels` keeps only those classes (e.g. the forget class), `exclude_labels` drops them (the rest).
    """

    kind: Literal["images"] = "images"
    source: str = Field(
        min_length=1,
        max_length=1000,
        description="builtin:digits, or an .npz file relative to the data root holding `images` "
        "[N, H, W] or [N, C, H, W] (uint8 0..255, or floats 0..1) and integer `labels` [N]",
    )
    labels: list[ClassId] | None = Field(
        default=None, min_length=1, max_length=1000, description="keep only these class ids"
    )
    exclude_labels: list[ClassId] | None = Field(
        default=None, min_length=1, max_length=1000, description="drop these class ids"
    )

    @model_validator(mode="after")
    def _one_filter(self) -> ImageData:
        if self.labels is not None and self.exclude_labels is not None:
            raise ValueError("give labels (classes to keep) or exclude_labels (classes to drop), not both")
        for name, ids in (("labels", self.labels), ("exclude_labels", self.exclude_labels)):
            if ids is not None and len(set(ids)) != len(ids):
                raise ValueError(f"{name} names a class id twice")
        return self

    def describe(self) -> str:
        """A short label such as ``images:builtin:digits[3]`` or ``images:data.npz[-3]``."""
        if self.labels is not None:
            return f"images:{self.source}[{','.join(map(str, self.labels))}]"
        if self.exclude_labels is not None:
            return f"images:{self.source}[-{',-'.join(map(str, self.exclude_labels))}]"
        return f"images:{self.source}"


DatasetSpec = Annotated[
    InlineData | FileData | HubData | BuiltinData | ImageData, Field(discriminator="kind")
]
TextSpec = InlineData | FileData | HubData | BuiltinData


def data_kind(specs: Sequence[DatasetSpec]) -> DataKind:
    """ "images" when the references are images, else "text"; ValueError for a mix of the two."""
    kinds = {"images" if isinstance(s, ImageData) else "text" for s in specs}
    if len(kinds) > 1:
        raise ValueError("a job reads texts or images, not both: every dataset must be of one kind")
    return "images" if kinds == {"images"} else "text"


def check_data_kind(model: str, specs: Sequence[DatasetSpec]) -> DataKind:
    """The datasets' kind, checked against a built-in model's (a local model's kind only the worker
    knows); ValueError naming the mismatch."""
    kind = data_kind(specs)
    if model in IMAGE_MODELS and kind == "text":
        raise ValueError(f"model {model!r} is an image classifier: its datasets must be {{'kind': 'images'}}")
    if model == EMBEDDED_MODEL and kind == "images":
        raise ValueError(f"model {model!r} is a language model: image datasets need an image classifier")
    if model in MASKED_LM_MODELS and kind == "images":
        raise ValueError(
            f"model {model!r} is a masked language model: its datasets must be texts, not images"
        )
    return kind
