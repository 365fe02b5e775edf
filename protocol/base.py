"""What every wire model shares: strict validation, the JSON wire form, and errors as data."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A wire model that rejects unknown fields."""

    model_config = ConfigDict(extra="forbid")


class ErrorInfo(BaseModel):
    """An error as data: the exception class name and a message meant for the caller."""

    type: str
    message: str


def dump(model: BaseModel) -> dict[str, Any]:
    """The wire form."""
    return model.model_dump(mode="json")
