"""Argument parsing: dataset specs and algorithm flags."""

from __future__ import annotations

import argparse

import pytest

from selprune.cli import build_parser, main
from selprune.cli_args import CliError, dataset_spec, describe_spec, params_from_args


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("builtin:python_code", {"kind": "builtin", "name": "python_code"}),
        ("file:corpora/mine.jsonl", {"kind": "file", "path": "corpora/mine.jsonl"}),
        ("inline:first text|second text", {"kind": "inline", "texts": ["first text", "second text"]}),
        ("inline:one: with a colon||", {"kind": "inline", "texts": ["one: with a colon"]}),
        ("hub:wikitext", {"kind": "hub", "id": "wikitext"}),
        ("images:builtin:digits", {"kind": "images", "source": "builtin:digits"}),
        ("images:builtin:digits[0,3]", {"kind": "images", "source": "builtin:digits", "labels": [0, 3]}),
        ("images:sets/mine.npz[-0]", {"kind": "images", "source": "sets/mine.npz", "exclude_labels": [0]}),
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
        ("images:", "needs a source"),
        ("images:builtin:digits[0,-3]", "not a mix"),
        ("images:builtin:digits[x]", "class ids"),
        ("images:builtin:digits[0", "class ids"),
        ("images:builtin:digits[]", "class ids"),
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


@pytest.mark.parametrize("full", [False, True])
def test_demo_body_is_a_valid_request(full):
    """The demo job validates as the gateway validates it; --full keeps the service's default budgets."""
    from protocol import PruneParams
    from selprune.local_commands import demo_body
    from service.schemas import UnlearnRequest

    request = UnlearnRequest.model_validate(demo_body(full=full))
    params, defaults = request.params, PruneParams()
    assert params.budget is not None and params.budget.max_retain_ppl_increase == 0.1 and params.steps == 10
    sizes = (params.collect_tokens, params.eval_tokens, params.token_limit)
    full_sizes = (defaults.collect_tokens, defaults.eval_tokens, defaults.token_limit)
    assert (sizes == full_sizes) is full
    assert all(small <= big for small, big in zip(sizes, full_sizes, strict=True))


def test_demo_full_flag():
    assert build_parser().parse_args(["demo", "--full"]).full
    assert not build_parser().parse_args(["demo"]).full


@pytest.mark.parametrize(
    "text", ["images:builtin:digits[0,3]", "images:sets/mine.npz[-0]", "images:builtin:digits"]
)
def test_image_specs_describe_as_the_service_does(text):
    from protocol import ImageData

    spec = dataset_spec(text)
    assert describe_spec(spec) == ImageData.model_validate(spec).describe() == text
