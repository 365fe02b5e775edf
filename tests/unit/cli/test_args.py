"""Argument parsing: dataset specs and algorithm flags."""

from __future__ import annotations

import argparse

import pytest

from selprune.cli import build_parser, main
from selprune.cli_args import CliError, dataset_spec, params_from_args


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("builtin:python_code", {"kind": "builtin", "name": "python_code"}),
        ("file:corpora/mine.jsonl", {"kind": "file", "path": "corpora/mine.jsonl"}),
        ("inline:first text|second text", {"kind": "inline", "texts": ["first text", "second text"]}),
        ("inline:one: with a colon||", {"kind": "inline", "texts": ["one: with a colon"]}),
        ("hub:wikitext", {"kind": "hub", "id": "wikitext"}),
    ],
)
def test_dataset_spec_parses(text, expected):
    assert dataset_spec(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("python_code", "has no kind"),
        ("builtin:nope", "unknown builtin dataset 'nope'"),
        ("file:", "relative to the data root"),
        ("file:/etc/passwd", "relative to the data root"),
        ("file:../outside.txt", "without '..'"),
        ("inline:| |", "inline dataset has no text"),
        ("s3:bucket/key", "dataset kind 's3' is not supported"),
    ],
)
def test_dataset_spec_rejects(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        dataset_spec(text)


def test_bad_dataset_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["submit", "--forget", "builtin:nope"])
    assert exc.value.code == 2
    assert "argument --forget: unknown builtin dataset 'nope'" in capsys.readouterr().err


def test_defaults_and_only_given_params():
    args = build_parser().parse_args(["prune"])
    assert args.forget == {"kind": "builtin", "name": "python_code"}
    assert args.retain == {"kind": "builtin", "name": "english_prose"}
    assert params_from_args(args) == {}  # PruneParams defaults apply

    args = build_parser().parse_args(
        ["submit", "--ff-frac", "0.05", "--steps", "3", "--scoring", "freq", "--random-baseline"]
    )
    assert params_from_args(args) == {
        "ff_frac": 0.05,
        "steps": 3,
        "ff_scoring": "freq",
        "attn_scoring": "freq",
        "random_baseline": True,
    }


def test_out_of_range_param_names_the_flag():
    args = build_parser().parse_args(["prune", "--ff-frac", "1.5"])
    with pytest.raises(CliError, match="--ff-frac") as exc:
        params_from_args(args)
    assert exc.value.code == 2


def test_generate_needs_a_prompt(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--mask", "abc"])
    assert exc.value.code == 2
    assert "prompt" in capsys.readouterr().err
