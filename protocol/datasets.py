"""Dataset references as they cross the wire: inline texts, a file under the data root, a hub
dataset, or a built-in corpus. The worker turns them into the core's references (worker/convert.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from protocol.base import Strict


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


DatasetSpec = Annotated[InlineData | FileData | HubData | BuiltinData, Field(discriminator="kind")]
