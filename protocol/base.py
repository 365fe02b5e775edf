"""What every wire model shares: strict validation, the JSON wire form, and errors as data."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

# A lone surrogate (U+D800..U+DFFF) is what a JSON "\ud800" escape decodes to: a Python str holds it, but
# it has no UTF-8 form, so neither Redis nor a JSON response could carry it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def surrogate_error(data: Any, path: str = "") -> str | None:
    """Where `data` (a JSON-like value: str, list, dict) holds a lone surrogate, as a message naming the
    field (e.g. `forget.texts[3]`) and the code point; None when it holds none. The message itself
    carries no surrogate, so it can be sent back as is."""
    if isinstance(data, str):
        found = _SURROGATE.search(data)
        if found is None:
            return None
        where = path or "value"
        return (
            f"{where}: lone surrogate U+{ord(found.group()):04X} at character {found.start()} "
            "is not valid Unicode text"
        )
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and _SURROGATE.search(key):
                return (
                    f"{path or 'body'}: a field name holds a lone surrogate, which is not valid Unicode text"
                )
            message = surrogate_error(value, f"{path}.{key}" if path else str(key))
            if message is not None:
                return message
    elif isinstance(data, list | tuple):
        for i, item in enumerate(data):
            message = surrogate_error(item, f"{path}[{i}]")
            if message is not None:
                return message
    return None


def reject_surrogates(data: Any) -> Any:
    """`data` unchanged, or a validation error naming the first string that holds a lone surrogate."""
    message = surrogate_error(data)
    if message is not None:
        raise ValueError(message)
    return data


class Strict(BaseModel):
    """A wire model that rejects unknown fields, and text that is not valid Unicode (lone surrogates)
    anywhere in its input."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return reject_surrogates(data)


class ErrorInfo(BaseModel):
    """An error as data: the exception class name and a message meant for the caller."""

    type: str
    message: str


def dump(model: BaseModel) -> dict[str, Any]:
    """The wire form."""
    return model.model_dump(mode="json")
