"""Dataset references and their resolution into train / held-out texts.

A reference is data (a frozen dataclass) so that it can cross the queue as JSON and be checked before any
text is read. Four kinds exist: inline texts, a file under a data root, a hub dataset (streamed) and a
built-in offline corpus (see ``corpora.py``). ``resolve_dataset`` turns any of them into ``TextSplits``.
"""

from __future__ import annotations

import csv
import json
import logging
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selprune_core.corpora import load_builtin
from selprune_core.errors import ConfigError, DatasetError, DatasetNotFoundError, EmptyDatasetError
from selprune_core.splits import TextSplits, split_texts

__all__ = [
    "InlineRef",
    "FileRef",
    "HubRef",
    "BuiltinRef",
    "DatasetRef",
    "RowFilter",
    "FILE_SUFFIXES",
    "parse_filter",
    "dataset_ref_from_dict",
    "describe",
    "resolve_dataset",
]

log = logging.getLogger(__name__)

# .txt files hold one text per non-empty line (not blank-line paragraphs): line files are the common
# export format for prompt lists, and a paragraph corpus can be written as jsonl instead.
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")

# datasets.load_dataset treats these ids as packaged local-file builders; as hub ids they would read
# files of the worker's choosing, bypassing the data-root confinement of FileRef.
_PACKAGED_BUILDERS = frozenset(
    "arrow audiofolder cache csv eval generator hdf5 imagefolder json lance niftifolder pandas parquet "
    "pdffolder spark sql text videofolder webdataset xml".split()
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILTER = re.compile(r"\s*([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*")
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}
_MISSING = object()


# ---------------------------------------------------------------------------------------------------------
# Row filters: "<field> <op> <number|quoted string>", parsed by hand (never eval'd: it comes from users).
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowFilter:
    """A parsed filter; rows missing the field, or holding a value of another type, never match."""

    field: str  # dotted path into nested dicts, e.g. "meta.pile_set_name"
    op: str  # one of >=, <=, >, <, ==, !=
    value: float | int | str
    expr: str  # the source text, for messages

    def matches(self, row: Mapping[str, object]) -> bool:
        got = _lookup(row, self.field)
        if got is _MISSING or got is None:
            return False
        if isinstance(self.value, str):
            return isinstance(got, str) and _OPS[self.op](got, self.value)
        if isinstance(got, str):  # CSV cells are strings: compare numerically when they parse
            try:
                got = float(got)
            except ValueError:
                return False
        if not isinstance(got, int | float):
            return False
        return _OPS[self.op](got, self.value)


def parse_filter(expr: str) -> RowFilter:
    """Parse ``toxicity >= 0.8`` or ``meta.source != "Github"``; raise ConfigError naming a bad one."""
    m = _FILTER.fullmatch(expr)
    if m is None:
        raise ConfigError(
            f"bad filter {expr!r}: expected '<field> <op> <number|quoted string>' with op in "
            f"{', '.join(_OPS)}, e.g. 'toxicity >= 0.8'"
        )
    field, op, raw = m.groups()
    value: float | int | str
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        value = raw[1:-1]
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(
                    f"bad filter {expr!r}: value {raw!r} is neither a number nor a quoted string"
                ) from None
    return RowFilter(field=field, op=op, value=value, expr=expr.strip())


def _lookup(row: Mapping[str, object], dotted: str) -> object:
    if dotted in row:  # a flat column whose name contains dots (CSV headers) wins
        return row[dotted]
    cur: object = row
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


# ---------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InlineRef:
    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.texts, tuple | list) or not all(isinstance(t, str) for t in self.texts):
            raise ConfigError("inline dataset: 'texts' must be a list of strings")
        object.__setattr__(self, "texts", tuple(self.texts))  # accept a list, store a tuple


@dataclass(frozen=True)
class FileRef:
    path: str  # relative to the data root given at resolve time
    text_field: str = "text"  # ignored for .txt files
    filter: str | None = None

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("file dataset: 'path' is empty")
        if not self.path.endswith(FILE_SUFFIXES):
            raise ConfigError(f"file dataset {self.path!r}: unsupported format, use one of {FILE_SUFFIXES}")
        if self.filter is not None:
            parse_filter(self.filter)  # fail at request time, not in the worker


@dataclass(frozen=True)
class HubRef:
    id: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    filter: str | None = None

    def __post_init__(self) -> None:
        if not _HUB_ID.fullmatch(self.id) or ".." in self.id or self.id.lower() in _PACKAGED_BUILDERS:
            raise ConfigError(f"hub dataset id {self.id!r} is not a hub id like 'name' or 'org/name'")
        if self.filter is not None:
            parse_filter(self.filter)


@dataclass(frozen=True)
class BuiltinRef:
    name: str


DatasetRef = InlineRef | FileRef | HubRef | BuiltinRef

_KINDS: dict[str, type[InlineRef | FileRef | HubRef | BuiltinRef]] = {
    "inline": InlineRef,
    "file": FileRef,
    "hub": HubRef,
    "builtin": BuiltinRef,
}


def dataset_ref_from_dict(d: Mapping[str, object]) -> DatasetRef:
    """Build a reference from ``{"kind": "inline"|"file"|"hub"|"builtin", ...fields}``."""
    kind = d.get("kind")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ConfigError(f"dataset kind {kind!r} is not one of {sorted(_KINDS)}")
    cls = _KINDS[kind]
    fields = cls.__dataclass_fields__
    unknown = sorted(set(d) - set(fields) - {"kind"})
    if unknown:
        raise ConfigError(f"{kind} dataset: unknown field(s) {unknown}; allowed {sorted(fields)}")
    kwargs = {k: v for k, v in d.items() if k != "kind"}
    if kind == "inline" and isinstance(kwargs.get("texts"), list):
        kwargs["texts"] = tuple(kwargs["texts"])  # type: ignore[arg-type]
    for name, value in kwargs.items():
        optional = fields[name].default is None
        if name != "texts" and not (isinstance(value, str) or (optional and value is None)):
            raise ConfigError(f"{kind} dataset: field {name!r} must be a string, got {type(value).__name__}")
    try:
        return cls(**kwargs)  # type: ignore[arg-type]
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{kind} dataset: {e}") from None


def describe(ref: DatasetRef) -> str:
    """A short label such as ``builtin:python_code`` or ``file:a.jsonl[body] where score > 1``."""
    match ref:
        case InlineRef():
            return f"inline:{len(ref.texts)} texts"
        case BuiltinRef():
            return f"builtin:{ref.name}"
        case FileRef():
            label = f"file:{ref.path}" + (f"[{ref.text_field}]" if ref.text_field != "text" else "")
        case HubRef():
            label = f"hub:{ref.id}" + (f":{ref.config}" if ref.config else "") + f"@{ref.split}"
            label += f"[{ref.text_field}]" if ref.text_field != "text" else ""
    return label + (f" where {ref.filter}" if ref.filter else "")


# ---------------------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------------------
def resolve_dataset(
    ref: DatasetRef, *, data_root: Path, cache_dir: Path, max_texts: int = 50_000
) -> TextSplits:
    """Read a reference into stripped, non-empty texts split into train and held-out parts.

    At most ``max_texts`` texts are read from the source, before splitting (for built-in corpora with
    their own split, each part is capped). Hub datasets use the process's Hugging Face cache settings.
    """
    if max_texts < 1:
        raise ConfigError(f"max_texts must be >= 1, got {max_texts}")
    name = describe(ref)
    match ref:
        case BuiltinRef():
            return load_builtin(ref.name, cache_dir, max_texts=max_texts)
        case InlineRef():
            texts = _take(((t, None) for t in ref.texts), None, max_texts, name)
        case FileRef():
            path = _confine(data_root, ref.path)
            rows = _file_rows(path, Path(ref.path).suffix, ref.text_field)
            texts = _take(_with_text(rows, ref.text_field, name), ref.filter, max_texts, name)
        case HubRef():
            rows = _hub_rows(ref)
            texts = _take(_with_text(rows, ref.text_field, name), ref.filter, max_texts, name)
    log.info("dataset %s: %d texts", name, len(texts))
    return split_texts(name, texts)


def _take(
    items: Iterator[tuple[object, Mapping[str, object] | None]], expr: str | None, cap: int, name: str
) -> list[str]:
    """Keep stripped, non-empty texts whose row passes the filter, stopping at ``cap``."""
    flt = parse_filter(expr) if expr else None
    out: list[str] = []
    seen = 0
    for text, row in items:
        seen += 1
        if flt is not None and row is not None and not flt.matches(row):
            continue
        if text is None:
            continue
        if not isinstance(text, str):
            raise DatasetError(f"{name}: the text field holds {type(text).__name__}, not a string")
        if text := text.strip():
            out.append(text)
            if len(out) >= cap:
                break
    if not out:
        why = f" after filter {flt.expr!r}" if flt else ""
        raise EmptyDatasetError(f"{name}: no non-empty text{why} ({seen} rows read)")
    return out


def _with_text(
    rows: Iterator[Mapping[str, object]], field: str, name: str
) -> Iterator[tuple[object, Mapping[str, object]]]:
    for row in rows:
        if field not in row:
            raise DatasetError(f"{name}: text field {field!r} not found; fields present: {sorted(row)}")
        yield row[field], row


def _confine(root: Path, rel: str) -> Path:
    """Resolve ``rel`` under ``root``; refuse absolute paths, '..' and symlinks that leave the root."""
    p = Path(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")):
        raise ConfigError(f"file dataset path {rel!r} must be relative to the data root")
    if ".." in p.parts:
        raise ConfigError(f"file dataset path {rel!r} must not contain '..'")
    base = root.resolve()
    full = (base / p).resolve()  # follows symlinks, so an escaping link is caught below
    if not full.is_relative_to(base):
        raise ConfigError(f"file dataset path {rel!r} resolves outside the data root")
    if not full.is_file():
        raise DatasetNotFoundError(f"file dataset {rel!r} not found under the data root")
    return full


def _file_rows(path: Path, suffix: str, text_field: str) -> Iterator[Mapping[str, object]]:
    """Rows of a local file, streamed where the format allows so that the cap stops reading early.

    The format comes from the reference's suffix, not the resolved path's (a symlink may differ).
    """
    try:
        if suffix == ".parquet":
            yield from _parquet_rows(path)
            return
        with path.open(encoding="utf-8-sig", newline="" if suffix == ".csv" else None) as f:
            if suffix == ".txt":
                yield from ({text_field: line} for line in f)
            elif suffix == ".csv":
                yield from csv.DictReader(f)
            elif suffix == ".jsonl":
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield _as_row(json.loads(line), path, lineno)
            else:  # .json: a list of objects or {"data": [...]}
                data = json.load(f)
                if isinstance(data, dict) and isinstance(data.get("data"), list):
                    data = data["data"]
                if not isinstance(data, list):
                    raise DatasetError(f"{path.name}: expected a list of objects or {{'data': [...]}}")
                yield from (_as_row(r, path, i) for i, r in enumerate(data, 1))
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path.name}: cannot parse: {e}") from e


def _as_row(obj: object, path: Path, index: int) -> Mapping[str, object]:
    if not isinstance(obj, dict):
        raise DatasetError(f"{path.name}: record {index} is a {type(obj).__name__}, not an object")
    return obj


def _parquet_rows(path: Path) -> Iterator[Mapping[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError("reading parquet needs pyarrow (installed with the 'worker' extra)") from None
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _hub_rows(ref: HubRef) -> Iterator[Mapping[str, object]]:
    """Stream a hub split; every failure to reach or open it becomes DatasetNotFoundError."""
    if Path(ref.id).exists():  # load_dataset would read a local folder of that name instead of the hub
        raise ConfigError(f"hub dataset id {ref.id!r} names a local path; use a file dataset instead")
    try:
        import datasets
    except ImportError:
        raise DatasetError("hub datasets need the 'datasets' package ('worker' extra)") from None
    label = describe(ref)
    try:
        # trust_remote_code=False: never run a dataset's loading script (datasets >= 4 cannot; older
        # releases could, which is why pyproject.toml sets a floor as well).
        stream = iter(
            datasets.load_dataset(
                ref.id, ref.config, split=ref.split, streaming=True, trust_remote_code=False
            )
        )
        first = next(stream, None)
    except Exception as e:  # offline, unknown id, bad config/split: datasets raises many types
        raise DatasetNotFoundError(
            f"{label}: cannot open the hub dataset ({type(e).__name__}: {e}); check the id, config and "
            "split, and that the Hugging Face hub is reachable or the dataset is cached"
        ) from e
    if first is None:
        return
    yield first
    try:
        yield from stream
    except Exception as e:  # a connection dropped mid-stream
        raise DatasetNotFoundError(
            f"{label}: reading the hub dataset failed ({type(e).__name__}: {e})"
        ) from e
