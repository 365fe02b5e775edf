"""The masked-LM section is read off the bench JSON: the model's accuracies, each step, random means,
separations and every target's verdict."""

from __future__ import annotations

import json
from pathlib import Path

from bench.mlm_report import mlm_section


def _report(step: int, code: float, prose: float) -> dict:
    def metrics(top1: float) -> dict:
        return {"top1": top1, "ci": {"top1": [top1 - 0.05, min(1.0, top1 + 0.05)]}}

    return {"step": step, "ff_pruned": 40 * step, "attn_pruned": 0,
            "metrics": {"forget": metrics(code), "retain": metrics(prose)}}  # fmt: skip


def _accuracy(top1: float, unigram: float) -> dict:
    return {"heldout": {"top1": top1, "top1_ci": [top1 - 0.01, top1 + 0.01], "unigram_top1": unigram}}


def test_the_section_shows_the_model_each_step_and_every_target(tmp_path: Path) -> None:
    assert "Not run" in "\n".join(mlm_section(tmp_path))
    exp = {
        "command": "python bench/mlm_code.py --json x.json",
        "seconds": 300.0,
        "settings": {
            "components": ["ff", "ff+attn"],
            "fracs": [0.02, 0.05],
            "chosen_components": "ff",
            "chosen_frac": 0.05,
            "chosen_steps": 1,
            "retain_limit": 0.1,
            "max_steps": 1,
            "random_seeds": 2,
        },
        "model": {
            "recipe": {
                "num_hidden_layers": 4,
                "hidden_size": 128,
                "intermediate_size": 512,
                "vocab_size": 4096,
                "steps": 1200,
            },  # fmt: skip
            "train_seconds": 240.0,
            "accuracy": {"python_code": _accuracy(0.4, 0.03), "english_prose": _accuracy(0.2, 0.05)},
        },
        "selective": [_report(0, 0.4, 0.2), _report(1, 0.2, 0.19)],
        "random": [
            [_report(0, 0.4, 0.2), _report(1, 0.38, 0.19)],
            [_report(0, 0.4, 0.2), _report(1, 0.36, 0.18)],
        ],
        "comparison": [
            {
                "step": 1,
                "selective_separation": 0.45,
                "selective_separation_ci": [0.3, 0.6],
                "difference": 0.4,
                "difference_ci": [0.25, 0.55],
            },  # fmt: skip
        ],
        "final": {"forget_drop": 0.5, "retain_drop": 0.05},
        "targets": {"selective_final_ci": True, "beats_random_every_step_ci": False},
    }
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "mlm_code.json").write_text(json.dumps(exp))
    section = "\n".join(mlm_section(tmp_path))
    row = "| 1 | 40 | 20.0% [15.0%, 25.0%] | 19.0% [14.0%, 24.0%] | 37.0% | 18.5% | +0.450 [+0.300, +0.600] | +0.400 [+0.250, +0.550] |"  # fmt: skip
    assert row in section
    assert "code 40.0% [39.0%, 41.0%] (always predicting the most common train token: 3.0%)" in section
    assert "prose 20.0% [19.0%, 21.0%] (unigram 5.0%)" in section
    assert "selective: final separation above 0 (95% interval): **met**" in section
    assert "above 0 at every step: **missed**" in section
    assert "ff at 5% per step for 1 steps" in section and "ff 0.02, ff 0.05, ff+attn 0.02" in section
    assert "code top-1 down 50.0% relative, prose down 5.0%" in section
    assert "the largest of the grid" in section and "code top-1 ends at 20.0%, still above" in section
