"""The ViT section is read off the bench JSON: steps, random means and every target's verdict."""

from __future__ import annotations

import json
from pathlib import Path

from bench.vit_recipes import class_sweep, pick
from bench.vit_report import _recipe_sweep, _shape_lines, choice_lines, vit_section


def _report(step: int, forget: float, retain: float) -> dict:
    def metrics(top1: float) -> dict:
        return {"top1": top1, "ci": {"top1": [top1 - 0.05, min(1.0, top1 + 0.05)]}}

    return {"step": step, "ff_pruned": 10 * step, "attn_pruned": 5 * step,
            "metrics": {"forget": metrics(forget), "retain": metrics(retain)}}  # fmt: skip


def test_the_section_shows_each_step_and_every_target_as_met_or_missed(tmp_path: Path) -> None:
    assert "Not run" in "\n".join(vit_section(tmp_path))
    exp = {
        "command": "python bench/vit_digits.py --json x.json",
        "seconds": 120.0,
        "settings": {
            "forget_class": 3,
            "eps": 1e-5,
            "chosen_ff_frac": 0.02,
            "chosen_steps": 1,
            "fracs": [0.01, 0.02],
            "random_seeds": 2,
        },  # fmt: skip
        "model": {
            "recipe": {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128},
            "accuracy": {"heldout": 0.95, "validation": 0.96, "train": 0.98},
        },  # fmt: skip
        "selective": [_report(0, 1.0, 0.95), _report(1, 0.1, 0.93)],
        "random": [
            [_report(0, 1.0, 0.95), _report(1, 0.9, 0.94)],
            [_report(0, 1.0, 0.95), _report(1, 0.7, 0.92)],
        ],
        "comparison": [{"step": 1, "difference": 0.5, "difference_ci": [0.4, 0.6]}],
        "final": {"forget_drop": 0.9, "retain_points_lost": 0.02},
        "targets": {
            "forget_drop_ge_80pct": True,
            "retain_loss_le_5pts": True,
            "beats_random_every_step_ci": False,
        },
    }
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "vit_digits.json").write_text(json.dumps(exp))
    section = "\n".join(vit_section(tmp_path))
    assert (
        "| 1 | 15 | 10.0% [5.0%, 15.0%] | 93.0% [88.0%, 98.0%] | 80.0% | 93.0% | +0.500 [+0.400, +0.600] |"
        in section
    )
    assert "at least 80% relative: **met**" in section and "above 0 at every step: **missed**" in section
    assert "Forget class 3" in section and "2.00 points down" in section


def test_other_forget_classes_get_one_row_each_and_a_count_per_target(tmp_path: Path) -> None:
    def exp(forget_class: int, drop: float, met: bool) -> dict:
        return {
            "command": f"python bench/vit_digits.py --forget-class {forget_class}",
            "seconds": 60.0,
            "settings": {"forget_class": forget_class, "eps": 1e-5, "chosen_ff_frac": 0.02, "chosen_steps": 3,
                         "fracs": [0.02], "random_seeds": 3},
            "model": {"recipe": {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128},
                      "accuracy": {"heldout": 0.95, "validation": 0.96, "train": 0.98}},
            "selective": [_report(0, 1.0, 0.95)],
            "random": [[_report(0, 1.0, 0.95)]],
            "comparison": [],
            "validation_sweep": [{"frac": 0.02, "curve": [{"step": 1, "forget_drop": drop,
                                                            "retain_points_lost": 0.01}]}],
            "final": {"forget_drop": drop, "retain_points_lost": 0.01},
            "targets": {"forget_drop_ge_80pct": met, "retain_loss_le_5pts": True},
        }  # fmt: skip

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "vit_digits.json").write_text(json.dumps(exp(0, 0.7, False)))
    assert "Every forget class" not in "\n".join(vit_section(tmp_path))  # one class: no table
    for forget_class, drop, met in ((1, 0.9, True), (2, 0.85, True)):
        path = tmp_path / "results" / f"vit_digits_class{forget_class}.json"
        path.write_text(json.dumps(exp(forget_class, drop, met)))
    section = "\n".join(vit_section(tmp_path))
    assert "| 1 | 2% x 3 | 3 | yes | 90.0% | 1.00 | met | met |" in section
    assert "| 0 | 2% x 3 | 3 | no | 70.0% | 1.00 | missed | met |" in section
    assert "On validation, 2 of 3 classes reached both targets" in section
    assert "forget drop >= 80%: 2 of 3; others lose <= 5 points: 3 of 3." in section


def test_the_recipe_sweep_counts_classes_meeting_both_targets_and_picks_among_accurate_models(
    tmp_path: Path,
) -> None:
    curves = [
        {"frac": 0.01, "curve": [{"forget_drop": 0.5, "retain_points_lost": 0.01},
                                 {"forget_drop": 0.9, "retain_points_lost": 0.06}]},
        {"frac": 0.02, "curve": [{"forget_drop": 0.7, "retain_points_lost": 0.04}]},
    ]  # fmt: skip
    assert class_sweep(curves) == {"qualifies": False, "best_forget_drop_within_limit": 0.7}
    curves[1]["curve"].append({"forget_drop": 0.8, "retain_points_lost": 0.05})
    assert class_sweep(curves) == {"qualifies": True, "best_forget_drop_within_limit": 0.8}

    def candidate(accuracy: float, qualifying: int, drop: float, width: int = 64) -> dict:
        return {"key": f"k{accuracy}{qualifying}", "train_seconds": 60.0 * qualifying, "validation_accuracy": accuracy, "classes_qualifying": qualifying, "mean_best_forget_drop": drop,
                "pruning_recipe": "paper", "per_class": {str(c): {} for c in range(10)},
                "recipe": {"hidden_size": width, "num_hidden_layers": 4, "intermediate_size": 128}}  # fmt: skip

    results = {
        "a": candidate(0.96, 3, 0.6),
        "b": candidate(0.955, 5, 0.5),  # within a point of the best: eligible, and the most classes
        "c": candidate(0.94, 9, 0.9),  # the most classes, but 2 points less accurate: not eligible
        "d": candidate(0.96, 5, 0.7),  # ties b on classes, higher mean drop: picked
    }
    assert pick(results) == "d"
    del results["d"]
    assert pick(results) == "b"

    (tmp_path / "results").mkdir()
    assert choice_lines(tmp_path, _recipe_sweep(tmp_path)) == []
    sweep = {"command": "python bench/vit_recipes.py", "seconds": 60.0, "accuracy_slack": 0.01,
             "picked": "b", "candidates": results}  # fmt: skip
    (tmp_path / "results" / "vit_recipes.json").write_text(json.dumps(sweep))
    section = "\n".join(choice_lines(tmp_path, _recipe_sweep(tmp_path)))
    assert "| b (picked) | 64 | 512 | paper | 95.5% | 5 of 10 | 50.0% |" in section
    assert "| c | 64 | 512 | paper | 94.0% | 9 of 10 | 90.0% |" in section
    assert "Disclosure" not in section
    assert (
        _shape_lines(_recipe_sweep(tmp_path), {"key": results["b"]["key"]}) == []
    )  # no "base" candidate to compare with
    results["base"] = candidate(0.96, 3, 0.6)
    (tmp_path / "results" / "vit_recipes.json").write_text(json.dumps(sweep))
    assert _shape_lines(_recipe_sweep(tmp_path), {"key": results["a"]["key"]}) == []  # not the picked shape
    shape = "\n".join(_shape_lines(_recipe_sweep(tmp_path), {"key": results["b"]["key"]}))
    assert (
        "trained in 180 s against 300 s here and met both targets on validation for 3 classes against 5"
        in shape
    )

    def first(forget_class: int, met: bool) -> dict:
        return {"settings": {"forget_class": forget_class}, "final": {"forget_drop": 0.5, "retain_points_lost": 0.06},
                "model": {"recipe": {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128}},
                "targets": {"forget_drop_ge_80pct": met, "retain_loss_le_5pts": False}}  # fmt: skip

    (tmp_path / "results" / "vit_digits_first_model.json").write_text(json.dumps(first(0, False)))
    (tmp_path / "results" / "vit_digits_first_model_class1.json").write_text(json.dumps(first(1, True)))
    section = "\n".join(choice_lines(tmp_path, _recipe_sweep(tmp_path)))
    assert "forget class 0 down 50.0%, the other classes 6.00 points down" in section
    assert (
        "over the 2 forget classes run, forget drop >= 80%: 1 of 2; others lose <= 5 points: 0 of 2"
        in section
    )
