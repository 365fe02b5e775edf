"""Checks a request passes before anything is queued: known model, datasets that exist and stay inside
the data root, inline sizes and token budgets under the configured caps, generation requests (model,
mask, prompt size, rows), and a body-size limit.

Every failure is an ApiError (422 unless noted) naming the offending field or value, so a rejected
request leaves Redis untouched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protocol import (
    EMBEDDED_MODEL,
    VIT_DIGITS_MODEL,
    BuiltinData,
    DatasetSpec,
    FileData,
    HubData,
    ImageData,
    InlineData,
    PruneParams,
)
from protocol.classify import decode_image
from protocol.constants import (
    BUILTIN_DATASETS,
    BUILTIN_IMAGE_SETS,
    FILE_SUFFIXES,
    IMAGE_FILE_SUFFIXES,
    IMAGE_MODELS,
    MASKED_LM_MODELS,
    MLM_CODE_PROSE_MODEL,
)
from protocol.constants import FILTER_PATTERN as _FILTER
from protocol.constants import HUB_ID_PATTERN as _HUB_ID
from protocol.constants import PACKAGED_BUILDERS as _PACKAGED_BUILDERS
from protocol.fill_mask import MASK_LITERAL
from service.deps import mask_id_path, mask_not_found
from service.errors import ApiError, error_response
from service.queue_client import QueueClient
from service.settings import GatewaySettings

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _invalid(type: str, message: str) -> ApiError:
    return ApiError(422, type, message)


# Models --------------------------------------------------------------------------------------------
def check_model(model: str, settings: GatewaySettings) -> None:
    """The model is in `settings.models` or `settings.builtin_models`, or is any hub id / folder name
    when `allow_any_model` is set (the built-in ones only when turned on, though)."""
    if model in settings.models or model in settings.builtin_models:
        return
    builtin = model in IMAGE_MODELS or model in MASKED_LM_MODELS
    if settings.allow_any_model and not builtin and not _CONTROL.search(model):
        return
    available = ", ".join([*settings.models, *settings.builtin_models])
    off = " (turned off here: SELPRUNE_BUILTIN_MODELS)" if builtin else ""
    raise _invalid("UnknownModel", f"unknown model {model!r}{off}; available: {available}")


def check_text_model(model: str, settings: GatewaySettings) -> None:
    """A known model that is not a built-in image classifier or masked LM (they do not generate)."""
    check_model(model, settings)
    if model in IMAGE_MODELS:
        raise _invalid("ModelKindMismatch", f"model {model!r} is an image classifier: use /v1/classify")
    if model in MASKED_LM_MODELS:
        raise _invalid("ModelKindMismatch", f"model {model!r} is a masked LM: use /v1/fill-mask")


# Datasets ------------------------------------------------------------------------------------------
def check_datasets(named: Sequence[tuple[str, DatasetSpec]], settings: GatewaySettings) -> None:
    """Each dataset resolvable, and the inline ones together under the size caps."""
    texts = chars = 0
    for field, spec in named:
        if isinstance(spec, InlineData):
            if not any(t.strip() for t in spec.texts):
                raise _invalid("EmptyDataset", f"{field}: every inline text is empty")
            texts += len(spec.texts)
            chars += sum(len(t) for t in spec.texts)
        elif isinstance(spec, FileData):
            check_file_path(field, spec.path, settings)
            _check_filter(field, spec.filter)
        elif isinstance(spec, HubData):
            if not _HUB_ID.fullmatch(spec.id) or ".." in spec.id or spec.id.lower() in _PACKAGED_BUILDERS:
                raise _invalid(
                    "InvalidDataset", f"{field}: {spec.id!r} is not a hub id like 'name' or 'org/name'"
                )
            _check_filter(field, spec.filter)
        elif isinstance(spec, ImageData):
            _check_image_source(field, spec.source, settings)
        elif isinstance(spec, BuiltinData) and spec.name not in BUILTIN_DATASETS:
            raise _invalid(
                "UnknownDataset",
                f"{field}: unknown builtin dataset {spec.name!r}; available: {', '.join(BUILTIN_DATASETS)}",
            )
    if texts > settings.max_inline_texts:
        raise _invalid(
            "LimitExceeded", f"inline datasets hold {texts} texts; the limit is {settings.max_inline_texts}"
        )
    if chars > settings.max_inline_chars:
        raise _invalid(
            "LimitExceeded",
            f"inline datasets hold {chars} characters; the limit is {settings.max_inline_chars}",
        )


def _check_image_source(field: str, source: str, settings: GatewaySettings) -> None:
    if source in BUILTIN_IMAGE_SETS:
        return
    if source.startswith("builtin:"):
        available = ", ".join(BUILTIN_IMAGE_SETS)
        raise _invalid(
            "UnknownDataset", f"{field}: unknown built-in image set {source!r}; available: {available}"
        )
    check_file_path(f"{field}.source", source, settings, IMAGE_FILE_SUFFIXES)


def check_file_path(
    field: str, path: str, settings: GatewaySettings, suffixes: tuple[str, ...] = FILE_SUFFIXES
) -> None:
    """`path` is relative, has no '..', and resolves (symlinks followed) to a file inside the data root."""
    if (
        PurePosixPath(path).is_absolute()
        or PureWindowsPath(path).is_absolute()
        or path.startswith(("/", "\\"))
    ):
        raise _invalid("PathOutsideDataRoot", f"{field}: path {path!r} must be relative to the data root")
    if ".." in PurePosixPath(path.replace("\\", "/")).parts or _CONTROL.search(path):
        raise _invalid("PathOutsideDataRoot", f"{field}: path {path!r} must not contain '..'")
    if not path.endswith(suffixes):
        raise _invalid(
            "InvalidDataset", f"{field}: {path!r} has an unsupported format; use one of {suffixes}"
        )
    root = os.path.realpath(settings.data_root)
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise _invalid("PathOutsideDataRoot", f"{field}: path {path!r} resolves outside the data root")
    if not os.path.isfile(full):
        raise _invalid("DatasetNotFound", f"{field}: file {path!r} not found under the data root")


def _check_filter(field: str, expr: str | None) -> None:
    if expr is not None and not _FILTER.fullmatch(expr):
        raise _invalid("InvalidDataset", f"{field}: filter {expr!r} is not like 'field >= value'")


# Budgets -------------------------------------------------------------------------------------------
def check_budget(field: str, value: int, cap: int) -> None:
    if value > cap:
        raise _invalid("LimitExceeded", f"{field} = {value} exceeds the limit {cap}")


def check_prune_params(params: PruneParams, settings: GatewaySettings) -> None:
    check_budget("params.collect_tokens", params.collect_tokens, settings.max_collect_tokens)
    check_budget("params.eval_tokens", params.eval_tokens, settings.max_eval_tokens)
    check_budget("params.steps", params.steps, settings.max_steps)


# Generation ----------------------------------------------------------------------------------------
MAX_STOP = 4  # stop strings per request, as OpenAI allows


@dataclass(frozen=True)
class GenerationFields:
    """The request's own names for what `check_generation` checks, so messages name the caller's field."""

    prompt: str = "prompt"
    max_tokens: str = "max_new_tokens"


async def check_generation(
    queue: QueueClient,
    settings: GatewaySettings,
    tenant: str,
    *,
    model: str | None,
    mask_id: str | None,
    texts: Sequence[str],
    max_new_tokens: int,
    rows: int,
    stop: Sequence[str],
    fields: GenerationFields | None = None,
) -> str:
    """A generation request within the caps, on a known model, through a mask the tenant may see and
    that was made on that model. Returns the model to run: `model`, or the mask's own when None."""
    fields = fields or GenerationFields()
    if model is None and mask_id is None:
        model = EMBEDDED_MODEL
    if model is not None:
        check_text_model(model, settings)
    chars = sum(len(t) for t in texts)
    if chars > settings.max_prompt_chars:
        raise ApiError(
            400,
            "PromptTooLong",
            f"{fields.prompt} holds {chars} characters; the limit is {settings.max_prompt_chars} "
            "(SELPRUNE_MAX_PROMPT_CHARS)",
        )
    check_budget(fields.max_tokens, max_new_tokens, settings.max_new_tokens)
    if rows > settings.max_generate_rows:
        cap = settings.max_generate_rows
        raise _invalid(
            "LimitExceeded", f"the request asks for {rows} completions (prompts x n); the limit is {cap}"
        )
    if len(stop) > MAX_STOP:
        raise _invalid("LimitExceeded", f"stop holds {len(stop)} strings; the limit is {MAX_STOP}")
    if any(not s for s in stop):
        raise _invalid("ValidationError", "stop: empty stop strings are not allowed")
    if mask_id is None:
        assert model is not None
        return model
    model = await _mask_model(queue, settings, tenant, model, mask_id, EMBEDDED_MODEL)
    check_text_model(model, settings)  # a mask made on an image classifier
    return model


async def _mask_model(
    queue: QueueClient, settings: GatewaySettings, tenant: str, model: str | None, mask_id: str, default: str
) -> str:
    """The model a request through `mask_id` runs: `model`, or the mask's own when None; 404 for a mask the
    tenant may not see, 422 for one made on another model."""
    meta = await queue.mask_meta(mask_id_path(mask_id), tenant)
    if meta is None:
        raise mask_not_found(mask_id)
    mask_model = meta.get("model")
    if model is None:
        model = str(mask_model or default)
        check_model(model, settings)
    elif mask_model not in (None, model):
        raise _invalid("MaskModelMismatch", f"mask {mask_id!r} is for model {mask_model!r}, not {model!r}")
    return model


async def _one_shot_model(
    queue: QueueClient,
    settings: GatewaySettings,
    tenant: str,
    model: str | None,
    mask_id: str | None,
    default: str,
) -> str:
    """The known model a classify or fill-mask request runs: `model`, the mask's own, or `default` (a
    built-in, which may be turned off: SELPRUNE_BUILTIN_MODELS)."""
    if model is not None:
        check_model(model, settings)
    if mask_id is not None:
        return await _mask_model(queue, settings, tenant, model, mask_id, default)
    if model is None:
        model = default
        check_model(model, settings)
    return model


# Classification ------------------------------------------------------------------------------------
async def check_classification(
    queue: QueueClient,
    settings: GatewaySettings,
    tenant: str,
    *,
    model: str | None,
    mask_id: str | None,
    images: Sequence[str],
) -> str:
    """Images that decode to PNG, JPEG or .npy files (422 InvalidImage naming the first that does not),
    a known model that is not the embedded language model, a mask the tenant may see made on that
    model. Returns the model to run: `model`, the mask's own, or the built-in digits ViT."""
    for i, text in enumerate(images):
        try:
            decode_image(text)
        except ValueError as exc:
            raise _invalid("InvalidImage", f"images[{i}]: {exc}") from None
    model = await _one_shot_model(queue, settings, tenant, model, mask_id, VIT_DIGITS_MODEL)
    if model == EMBEDDED_MODEL:
        raise _invalid("ModelKindMismatch", f"model {model!r} is a language model: use /v1/generate")
    if model in MASKED_LM_MODELS:
        raise _invalid("ModelKindMismatch", f"model {model!r} is a masked LM: use /v1/fill-mask")
    return model


# Fill-mask -----------------------------------------------------------------------------------------
async def check_fill_mask(
    queue: QueueClient,
    settings: GatewaySettings,
    tenant: str,
    *,
    model: str | None,
    mask_id: str | None,
    inputs: Sequence[str],
) -> str:
    """A known model that is not a built-in causal LM or image classifier, a mask the tenant may see made
    on that model, and for a built-in masked LM (whose mask token is "<mask>") inputs that each hold one
    (a local model's mask token only the worker knows: it answers InvalidInput). Returns the model to run:
    `model`, the mask's own, or the built-in code/prose MLM."""
    model = await _one_shot_model(queue, settings, tenant, model, mask_id, MLM_CODE_PROSE_MODEL)
    if model == EMBEDDED_MODEL or model in IMAGE_MODELS:
        use = "/v1/generate" if model == EMBEDDED_MODEL else "/v1/classify"
        raise _invalid("ModelKindMismatch", f"model {model!r} is not a masked LM: use {use}")
    if model in MASKED_LM_MODELS:
        for i, text in enumerate(inputs):
            if MASK_LITERAL not in text:
                raise _invalid(
                    "InvalidInput", f"inputs[{i}] has no mask token: write {MASK_LITERAL} where to fill"
                )
    return model


# Body size -----------------------------------------------------------------------------------------
class BodySizeLimitMiddleware:
    """413 for a body over `max_bytes`, judged by Content-Length and by the bytes actually received.

    A POST/PUT/PATCH body is read whole (it is at most `max_bytes`) and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "BadRequest", "invalid Content-Length")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await self._reject(scope, receive, send)
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body exceeds {self.max_bytes} bytes"
        await error_response(413, "PayloadTooLarge", message, {"Connection": "close"})(scope, receive, send)
