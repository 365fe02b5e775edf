"""The 'Is it really gone?' section reads its verdicts off the bench JSON: a baseline that beats the
mask is reported as beating it, an unmatched one as unmatched, a membership interval off 0.5 is named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.attacks_report import attacks_section, verdicts


def _row(
    forget: float, retain: float, *, auc: float = 0.5, ci: tuple[float, float] = (0.4, 0.6), **extra: Any
):
    base_forget, base_retain = 0.5, 0.4
    return {
        "eval": {
            "forget": {"top1": forget, "top1_ci": [forget - 0.01, forget + 0.01]},
            "retain": {"top1": retain, "top1_ci": [retain - 0.01, retain + 0.01]},
        },
        "forget_drop": (base_forget - forget) / base_forget,
        "retain_drop": (base_retain - retain) / base_retain,
        "membership": {"auc": auc, "ci": list(ci)},
        "toxicity": None,
        "relearned_forget_top1": extra.pop("relearned", forget),
        "seconds": 60.0,
        **extra,
    }


def _exp(**rows: dict[str, Any]) -> dict[str, Any]:
    settings = {"relearn_n": 16, "relearn_steps": 10, "steps": 20, "batch_size": 4, "token_limit": 128,
                "lr": 2e-5, "eval_every": 5, "alphas": [0.5, 1.0], "eval_tokens": 1000, "mia_texts": 60,
                "tox_prompts": 100}  # fmt: skip
    return {
        "task": "code",
        "retain_cost": 0.05,
        "settings": settings,
        "seconds": 600.0,
        "rows": {"unpruned": _row(0.5, 0.4), "selective_pruning": _row(0.3, 0.38, relearned=0.4), **rows},
    }


def test_a_baseline_that_forgets_more_at_matched_cost_is_reported_as_beating_the_mask() -> None:
    exp = _exp(gradient_ascent=_row(0.2, 0.39, matched=True, steps=10))
    lines = "\n".join(verdicts(exp))
    assert "does not beat the best matched baseline, gradient ascent (60.0%)" in lines
    assert "brings back 50.0% of the forget accuracy" in lines


def test_an_unmatched_baseline_is_named_and_not_compared() -> None:
    exp = _exp(
        gradient_ascent=_row(0.1, 0.2, matched=False, steps=5),
        task_arithmetic=_row(0.45, 0.39, matched=True, alpha=0.5),
    )
    lines = "\n".join(verdicts(exp))
    assert "Not matched" in lines and "gradient ascent" in lines.split("Not matched")[1].splitlines()[0]
    assert "beats the best matched baseline, task arithmetic (10.0%)" in lines


def test_membership_intervals_off_one_half_are_named(tmp_path: Path) -> None:
    exp = _exp(gradient_difference=_row(0.3, 0.38, auc=0.3, ci=(0.2, 0.4), matched=True, steps=20))
    lines = "\n".join(verdicts(exp))
    assert "gradient difference's AUC 0.300 [0.200, 0.400] lies below 0.5" in lines
    assert "selective pruning (mask)'s AUC" not in lines  # its interval holds 0.5

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "baselines_code.json").write_text(json.dumps(exp))
    section = "\n".join(attacks_section(tmp_path))
    assert (tmp_path / "results" / "baselines.png").stat().st_size > 0
    assert "| gradient difference | 20 steps | 30.0% [29.0%, 31.0%] (40.0%)" in section


def test_a_baseline_that_never_spent_the_retain_budget_is_called_under_spent() -> None:
    checkpoints = [{"retain_drop": 0.0, "forget_drop": 0.0}, {"retain_drop": 0.01, "forget_drop": 0.02}]
    exp = _exp(gradient_ascent=_row(0.49, 0.396, matched=True, steps=20, checkpoints=checkpoints))
    lines = "\n".join(verdicts(exp))
    assert "Under-spent: gradient ascent (largest retain drop 1.0%)" in lines


def test_overlapping_forget_intervals_are_not_called_a_separation() -> None:
    baseline = _row(0.32, 0.39, matched=True, steps=10)
    baseline["eval"]["forget"]["top1_ci"] = [0.27, 0.37]  # holds the mask's 0.30
    lines = "\n".join(verdicts(_exp(gradient_ascent=baseline)))
    assert "beats the best matched baseline, gradient ascent (36.0%) on the point estimates" in lines
    assert "does not separate the two" in lines
    separated = "\n".join(verdicts(_exp(gradient_ascent=_row(0.33, 0.39, matched=True, steps=10))))
    assert "intervals do not overlap" in separated and "does not separate" not in separated


def test_relearning_that_lowers_forget_accuracy_brings_none_back() -> None:
    exp = _exp()
    exp["rows"]["selective_pruning"]["relearned_forget_top1"] = 0.29  # below the mask's 0.30
    lines = "\n".join(verdicts(exp))
    assert "brings back none of the forget accuracy the mask removed (30.0% → 29.0%)" in lines


def _tox(rate: float, lo: float, hi: float) -> dict[str, Any]:
    return {"toxic_rate": rate, "wilson": {"toxic_rate": [lo, hi]}}


def test_a_toxicity_change_inside_the_intervals_is_called_unresolved() -> None:
    exp = _exp()
    exp["rows"]["unpruned"]["toxicity"] = _tox(0.05, 0.02, 0.11)
    exp["rows"]["selective_pruning"]["toxicity"] = _tox(0.02, 0.006, 0.07)
    assert "does not resolve its change" in "\n".join(verdicts(exp))
    exp["rows"]["selective_pruning"]["toxicity"] = _tox(0.0, 0.0, 0.01)
    assert "does not resolve" not in "\n".join(verdicts(exp))


def _relearn(base_after: list[float]) -> dict[str, Any]:
    before = {"base": {"forget": {"top1": 0.34}}, "mask": {"forget": {"top1": 0.30}}}
    runs = [
        {"n": n, "start": "base", "after": {"forget": {"top1": a}}}
        for n, a in zip((4, 16), base_after, strict=True)
    ]
    return {"before": before, "runs": runs}


def test_relearning_that_lowers_even_the_unpruned_model_is_flagged() -> None:
    from bench.attacks_report import relearn_caveat

    assert "cannot show relearning" in (relearn_caveat(_relearn([0.31, 0.32])) or "")
    assert relearn_caveat(_relearn([0.31, 0.36])) is None  # one N did teach the unpruned model
