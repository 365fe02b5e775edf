"""bench/fidelity.py end to end on a tiny model with the smoke budget: JSON, plots, and a report
that `report` regenerates from the JSON alone."""

from __future__ import annotations

import json

from bench import fidelity


def test_smoke_run_writes_json_plots_and_a_regenerable_report(model_dir, tmp_path):
    out = tmp_path / "docs"
    args = ["code_vs_prose", "--budget", "smoke", "--model", str(model_dir), "--dtype", "float32"]
    assert fidelity.main([*args, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0

    exp = json.loads((out / "results" / "code_vs_prose.json").read_text())
    assert exp["complete"] and set(exp["runs"]) == {
        "code_ff_abs",
        "code_ff_random",
        "prose_ff_abs",
        "prose_ff_random",
    }
    run = exp["runs"]["code_ff_abs"]
    assert [s["step"] for s in run["steps"]] == [0, 1, 2]
    assert run["steps"][1]["metrics"]["forget"]["ci"]["top1"]  # intervals are recorded
    assert exp["runs"]["code_ff_random"]["spec"]["random"]
    for png in ("code_vs_prose_python_code.png", "code_vs_prose_english_prose.png"):
        assert (out / "results" / png).read_bytes().startswith(b"\x89PNG")

    report = (out / "results.md").read_text()
    assert "(a) Forget Python code" in report and "python bench/fidelity.py code_vs_prose" in report
    assert "Not run" in report  # the other experiments are reported as missing, not invented

    # A rerun reuses finished runs; `report` rewrites the same markdown from the JSON alone.
    assert (
        fidelity.main([*args, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-report"]) == 0
    )
    assert json.loads((out / "results" / "code_vs_prose.json").read_text())["runs"] == exp["runs"]
    (out / "results.md").unlink()
    assert fidelity.main(["report", "--out", str(out)]) == 0
    assert (out / "results.md").read_text() == report


def test_smoke_keep_experiments_report_targets_from_their_json(model_dir, tmp_path):
    """The issue-9 experiments on a tiny model: random runs copy the default's per-layer counts, the
    budgeted run records its trials, and the report marks each target met or missed."""
    out = tmp_path / "docs"
    common = ["--budget", "smoke", "--model", str(model_dir), "--dtype", "float32", "--no-report"]
    common += ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    for experiment in ("keep", "keep_budget"):
        assert fidelity.main([experiment, *common]) == 0
    keep = json.loads((out / "results" / "keep.json").read_text())["runs"]
    chosen = [(r["ff_per_layer"], r["attn_per_layer"]) for r in keep["keep_selprune"]["steps"][1:]]
    for seed in range(3):
        random_run = keep[f"keep_random_s{seed}"]
        assert [(r["ff_per_layer"], r["attn_per_layer"]) for r in random_run["steps"][1:]] == chosen
    budget_run = json.loads((out / "results" / "keep_budget.json").read_text())["runs"]["keep_budget"]
    assert all("accepted" in r and "budget" in r for r in budget_run["steps"])
    assert fidelity.main(["report", "--out", str(out)]) == 0
    report = (out / "results.md").read_text()
    assert "## Unlearning that keeps the model (held-out texts)" in report
    assert report.count("**met**") + report.count("**missed**") >= 6  # 5 selective runs + the demo job
