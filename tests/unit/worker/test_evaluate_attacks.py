"""The evaluate job's attack metrics on a tiny model: membership (the loss attack's AUC) and relearn
(fine-tuning a copy through the mask), run through the job function the worker runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protocol import EvaluateJob, JobProgress
from selprune.console import ConsoleContext
from selprune_core.config import EvalConfig
from selprune_core.errors import CancelledError
from selprune_core.finetune import FinetuneConfig, finetune
from selprune_core.masking import apply_mask
from selprune_core.membership import text_losses
from selprune_core.splits import split_texts
from tests.helpers import CORPUS, random_mask
from worker.evaluate_job import run_evaluate
from worker.runtime import ModelRuntime

TEXTS = [f"{text} {i}" for i in range(6) for text in CORPUS]  # 48 distinct texts


@pytest.fixture
def runtime(tmp_path: Path) -> ModelRuntime:
    return ModelRuntime(cache_dir=tmp_path / "cache", data_root=tmp_path, device="cpu", dtype="float32")


def _job(model_dir: Path, mask_id: str | None, **fields: object) -> EvaluateJob:
    return EvaluateJob.model_validate(
        {
            "job_id": "j1",
            "tenant": "t",
            "model": str(model_dir),
            "mask_id": mask_id,
            "datasets": [{"kind": "inline", "texts": TEXTS}],
            "eval_tokens": 10_000,
            "token_limit": 32,
            **fields,
        }
    )


def test_relearn_lowers_held_out_loss_through_the_mask_and_leaves_the_served_model_alone(
    model_dir: Path, runtime: ModelRuntime, tmp_path: Path
) -> None:
    loaded = runtime.model(str(model_dir))
    mask = random_mask(loaded.model, seed=1, frac=0.3)
    mask.save(tmp_path, {})
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    job = _job(
        model_dir,
        mask.mask_id,
        metrics=["next_token", "relearn"],
        relearn_texts=32,
        relearn_steps=15,
        relearn_learning_rate=3e-3,
    )
    out = run_evaluate(job, runtime, ConsoleContext(tmp_path))

    (name,) = out["results"]["masked"]
    for variant in ("base", "masked"):
        result = out["results"][variant][name]
        relearn = result["relearn"]
        # The copy learned the dataset: held-out loss falls, on the same sampled predictions.
        assert relearn["after"]["n_tokens"] == result["next_token"]["n_tokens"]
        assert relearn["after"]["loss"] < result["next_token"]["loss"] - 0.1
        assert relearn["texts"] == 32 and relearn["steps"] == 15 and relearn["train_tokens"] > 0
    # The shared model is untouched: same weights, same dtype, no hooks left behind.
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in loaded.model.modules())


def test_membership_separates_texts_the_model_was_trained_on(
    model_dir: Path, runtime: ModelRuntime, tmp_path: Path
) -> None:
    """Fit the tiny model to the train side for a while: the attack must then see members; before,
    on a random model, it must not see them any better than chance allows."""
    job = _job(model_dir, None, metrics=["membership"], membership_texts=64)
    loaded = runtime.model(str(model_dir))
    fresh = run_evaluate(job, runtime, ConsoleContext(tmp_path))["results"]["base"]
    (name,) = fresh
    lo, hi = fresh[name]["membership"]["ci"]
    assert lo <= 0.5 <= hi or abs(fresh[name]["membership"]["auc"] - 0.5) < 0.25

    train = list(split_texts(name, TEXTS).train)
    finetune(
        loaded.model, loaded.tokenizer, train, FinetuneConfig(steps=60, learning_rate=3e-3, token_limit=32)
    )
    fitted = run_evaluate(job, runtime, ConsoleContext(tmp_path))["results"]["base"][name]["membership"]
    assert fitted["n_members"] == len(train) and fitted["n_nonmembers"] == len(TEXTS) - len(train)
    assert fitted["member_loss"] < fitted["nonmember_loss"]
    assert fitted["auc"] > 0.6 and fitted["ci"][0] <= fitted["auc"] <= fitted["ci"][1]


def test_membership_through_a_mask_scores_the_masked_model(
    model_dir: Path, runtime: ModelRuntime, tmp_path: Path
) -> None:
    loaded = runtime.model(str(model_dir))
    mask = random_mask(loaded.model, seed=2, frac=0.5)
    mask.save(tmp_path, {})
    job = _job(model_dir, mask.mask_id, metrics=["membership", "next_token"])
    results = run_evaluate(job, runtime, ConsoleContext(tmp_path))["results"]
    (name,) = results["base"]
    base, masked = results["base"][name]["membership"], results["masked"][name]["membership"]
    assert base["member_loss"] != masked["member_loss"]
    # The member loss is the mean per-text loss of the masked model on the train side.
    splits = split_texts(name, TEXTS)
    whole = EvalConfig(token_limit=job.token_limit, sample_tokens=10**9)
    with apply_mask(loaded.model, loaded.sites, mask):
        losses = text_losses(loaded.model, loaded.tokenizer, splits.train, whole)
    assert masked["member_loss"] == pytest.approx(float(losses.mean()), rel=1e-5)


class CancelWhileRelearning(ConsoleContext):
    """Asks to stop once the relearning phase began: the next check is inside the training loop."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(out_dir)
        self.relearning = False
        self.checks_while_relearning = 0

    def progress(self, progress: JobProgress) -> None:
        super().progress(progress)
        self.relearning = progress.phase.startswith("relearning")

    def should_cancel(self) -> bool:
        if self.relearning:
            self.checks_while_relearning += 1
            return (
                self.checks_while_relearning > 1
            )  # the check before training passes; the first step's stops
        return False


def test_a_cancel_stops_relearning_between_optimizer_steps(
    model_dir: Path, runtime: ModelRuntime, tmp_path: Path
) -> None:
    loaded = runtime.model(str(model_dir))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    ctx = CancelWhileRelearning(tmp_path)
    with pytest.raises(CancelledError, match="relearning stopped"):
        run_evaluate(_job(model_dir, None, metrics=["relearn"], relearn_steps=200), runtime, ctx)
    assert ctx.checks_while_relearning == 2
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert all(p.requires_grad is False for p in loaded.model.parameters())


def test_two_datasets_described_alike_both_keep_their_results(
    model_dir: Path, runtime: ModelRuntime, tmp_path: Path
) -> None:
    """Two inline sets of as many texts share a description; each must still get its own results."""
    other = [text.upper() for text in TEXTS]
    job = _job(
        model_dir, None, datasets=[{"kind": "inline", "texts": TEXTS}, {"kind": "inline", "texts": other}]
    )
    results = run_evaluate(job, runtime, ConsoleContext(tmp_path))["results"]["base"]
    first, second = results  # insertion order: the request's order
    assert second == f"{first} (2)"
    assert results[first]["next_token"]["loss"] != results[second]["next_token"]["loss"]


def test_set_names_number_repeats_and_avoid_taken_names() -> None:
    from protocol import InlineData
    from worker.convert import set_names

    a, b = InlineData(texts=["x", "y"]), InlineData(texts=["p", "q"])
    (name,) = set_names([a])
    assert set_names([a, b, a]) == [name, f"{name} (2)", f"{name} (3)"]
    assert set_names([a], taken={name}) == [f"{name} (2)"]
