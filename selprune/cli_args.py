"""The command line's vocabulary: exit codes, CliError, dataset specs (`builtin:NAME`, `file:PATH`,
`inline:TEXT1|TEXT2`, `hub:ID`, `images:SOURCE[LABELS]`) and the job flags `prune` and `submit` share, checked against the wire
contract's PruneParams before anything runs or is sent."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any, get_args

from pydantic import ValidationError

from protocol import (
    EMBEDDED_MODEL,
    RECIPES,
    OffsetMode,
    PruneParams,
    ScoringName,
    SelectionMode,
)
from protocol.constants import BUILTIN_DATASETS

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

DEFAULT_FORGET = "builtin:python_code"
DEFAULT_RETAIN = "builtin:english_prose"
# The built-in datasets that need `selprune setup` (the continuations are generated from `toxic`).
TOXIC_BUILTINS = ("toxic", "toxic_prompts", "toxic_continuations", "clean_continuations")


class CliError(Exception):
    """A failure to report in one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# --- dataset specs ----------------------------------------------------------------------------------------
def dataset_spec(text: str) -> dict[str, Any]:
    """Parse `builtin:NAME`, `file:PATH` (relative to the data root), `inline:TEXT1|TEXT2`, `hub:ID` or
    `images:SOURCE[LABELS]` into the wire form of a dataset reference (protocol.DatasetSpec)."""
    kind, sep, rest = text.partition(":")
    kinds = "builtin:NAME, file:PATH, inline:TEXT1|TEXT2, hub:ID or images:SOURCE[LABELS]"
    if not sep:
        raise argparse.ArgumentTypeError(f"dataset {text!r} has no kind; use {kinds} (e.g. {DEFAULT_FORGET})")
    if kind == "builtin":
        if rest not in BUILTIN_DATASETS:
            raise argparse.ArgumentTypeError(
                f"unknown builtin dataset {rest!r}; available: {', '.join(BUILTIN_DATASETS)}"
            )
        return {"kind": "builtin", "name": rest}
    if kind == "file":
        path = PurePosixPath(rest)
        if not rest or path.is_absolute() or ".." in path.parts:
            raise argparse.ArgumentTypeError(
                f"file dataset {rest!r}: give a path relative to the data root (SELPRUNE_DATA_ROOT), "
                "without '..'"
            )
        return {"kind": "file", "path": rest}
    if kind == "inline":
        texts = [t for t in rest.split("|") if t.strip()]
        if not texts:
            raise argparse.ArgumentTypeError("inline dataset has no text; use inline:first text|second text")
        return {"kind": "inline", "texts": texts}
    if kind == "hub":
        if not rest:
            raise argparse.ArgumentTypeError("hub dataset needs an id, e.g. hub:wikitext")
        return {"kind": "hub", "id": rest}
    if kind == "images":
        return _image_spec(rest)
    raise argparse.ArgumentTypeError(f"dataset kind {kind!r} is not supported; use {kinds}")


def _image_spec(rest: str) -> dict[str, Any]:
    """`SOURCE` (every class), `SOURCE[0,3]` (only classes 0 and 3) or `SOURCE[-0]` (all but class 0),
    the form the service's mask metadata describes image data in."""
    source, bracket, labels = rest.partition("[")
    if not source:
        raise argparse.ArgumentTypeError("image dataset needs a source, e.g. images:builtin:digits[0]")
    spec: dict[str, Any] = {"kind": "images", "source": source}
    if not bracket:
        return spec
    items = [item.strip() for item in labels.removesuffix("]").split(",")] if labels.endswith("]") else []
    excluded = [item.startswith("-") for item in items]
    ids = [item.removeprefix("-") for item in items]
    if not items or not all(i.isdigit() for i in ids) or len(set(excluded)) != 1:
        raise argparse.ArgumentTypeError(
            f"image labels {'[' + labels!r}: give class ids to keep, [0,3], or to drop, [-0,-3]; not a mix"
        )
    spec["exclude_labels" if excluded[0] else "labels"] = [int(i) for i in ids]
    return spec


def describe_spec(spec: dict[str, Any]) -> str:
    kind = spec["kind"]
    if kind == "images":
        kept = spec.get("labels") or [f"-{i}" for i in spec.get("exclude_labels") or []]
        return f"images:{spec['source']}" + (f"[{','.join(map(str, kept))}]" if kept else "")
    if kind == "inline":
        return f"inline ({len(spec['texts'])} texts)"
    return f"{kind}:{spec.get('name') or spec.get('path') or spec.get('id')}"


# --- shared arguments -------------------------------------------------------------------------------------
def add_job_args(p: argparse.ArgumentParser) -> None:
    """Dataset and algorithm flags shared by `prune` and `submit`; unset flags keep PruneParams defaults."""
    fields = PruneParams.model_fields
    p.add_argument("--model", default=EMBEDDED_MODEL, help="model reference (default: %(default)s)")
    kinds = (
        "builtin:NAME, file:PATH (under the data root), inline:TEXT1|TEXT2, hub:ID or images:SOURCE[LABELS]"
    )
    p.add_argument(
        "--forget",
        type=dataset_spec,
        default=DEFAULT_FORGET,
        metavar="DATA",
        help=f"what to unlearn: {kinds} (default: %(default)s)",
    )
    p.add_argument(
        "--retain",
        type=dataset_spec,
        default=DEFAULT_RETAIN,
        metavar="DATA",
        help="what to keep (%(default)s)",
    )
    p.add_argument("--name", help="a name for the job and its mask")

    def knob(flag: str, field: str, kind: Callable[[str], Any], metavar: str, what: str = "") -> None:
        info = fields[field]
        help_text = f"{what or info.description or field} (default: {info.default})"
        p.add_argument(flag, type=kind, default=None, metavar=metavar, help=help_text)

    knob("--ff-frac", "ff_frac", float, "F")
    knob("--attn-frac", "attn_frac", float, "F")
    knob("--steps", "steps", int, "N", "pruning steps")
    knob("--collect-tokens", "collect_tokens", int, "N")
    knob("--eval-tokens", "eval_tokens", int, "N")
    knob("--token-limit", "token_limit", int, "N", "tokens per text (longer texts are truncated)")
    knob("--batch-size", "batch_size", int, "N", "texts per forward pass")
    knob("--seed", "seed", int, "N", "seed of sampling and random selection")
    p.add_argument(
        "--scoring",
        choices=get_args(ScoringName),
        default=None,
        metavar="NAME",
        help=f"neuron scoring for FF and attention: {', '.join(get_args(ScoringName))} "
        f"(default: {fields['ff_scoring'].default})",
    )
    p.add_argument(
        "--random-baseline", action="store_true", default=None, help="prune random neurons (a control)"
    )
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help=f"named defaults for the method flags below (default: {fields['recipe'].default})",
    )
    p.add_argument(
        "--offset-mode", choices=get_args(OffsetMode), default=None, help="what a pruned neuron outputs"
    )
    p.add_argument(
        "--selection", choices=get_args(SelectionMode), default=None, help="global or per-layer top-k"
    )
    knob("--skip-first", "skip_first", int, "K", "leave each text's first K positions out of the statistics")
    p.add_argument(
        "--pack", action=argparse.BooleanOptionalAction, default=None, help="pack texts into full windows"
    )
    p.add_argument(
        "--max-retain-drop", type=float, default=None, metavar="F", help="retain budget: top-1 drop"
    )
    p.add_argument(
        "--max-retain-ppl-increase",
        type=float,
        default=None,
        metavar="F",
        help="retain budget: perplexity increase (0.1 = +10%%)",
    )
    p.add_argument(
        "--forget-target",
        type=float,
        default=None,
        metavar="F",
        help="with a budget: stop at this forget drop",
    )


def params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The PruneParams fields set on the command line (validated); others keep their defaults."""
    names = ("ff_frac", "attn_frac", "steps", "collect_tokens", "eval_tokens", "token_limit", "batch_size")
    params = {name: getattr(args, name) for name in (*names, "seed") if getattr(args, name) is not None}
    if args.scoring is not None:
        params["ff_scoring"] = params["attn_scoring"] = args.scoring
    if args.random_baseline:
        params["random_baseline"] = True
    for name in ("recipe", "offset_mode", "selection", "skip_first", "pack"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    budget = {
        name: getattr(args, name)
        for name in ("max_retain_drop", "max_retain_ppl_increase", "forget_target")
        if getattr(args, name) is not None
    }
    if budget:
        params["budget"] = budget
    try:
        PruneParams.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(f"--{_flag(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise CliError(problems, EXIT_USAGE) from None
    return params


def _flag(loc: tuple[int | str, ...]) -> str:
    name = "-".join(str(part) for part in loc).replace("_", "-")
    return "scoring" if name.endswith("-scoring") else name
