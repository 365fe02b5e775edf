from __future__ import annotations

import math

import pytest
import torch

from selprune_core.activations import ComponentStats
from selprune_core.scoring import (
    SCORERS,
    required_fields,
    score_neurons,
    select_random_per_layer,
    select_top_heads,
    select_top_neurons,
)


def _stats(values: list[list[float]]) -> ComponentStats:
    """Stats of one layer whose neuron j saw the tokens values[j] (all the same length)."""
    x = torch.tensor(values, dtype=torch.float64).T  # [tokens, d]
    return ComponentStats(
        n=x.shape[0],
        sum=x.sum(0)[None],
        sum_sq=(x * x).sum(0)[None],
        sum_abs=x.abs().sum(0)[None],
        sum_sqrt=x.abs().sqrt().sum(0)[None],
        pos_count=(x > 0).double().sum(0)[None],
    )


FORGET = _stats([[1.0, -3.0, 2.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
RETAIN = _stats([[0.0, 0.0, 1.0, -1.0], [4.0, -4.0, 2.0, 2.0]])


def test_importances_match_hand_computation():
    # neuron 0, forget: tokens 1, -3, 2, 0
    assert FORGET.abs[0, 0].item() == pytest.approx(6 / 4)
    assert FORGET.freq[0, 0].item() == pytest.approx(2 / 4)
    assert FORGET.mean[0, 0].item() == pytest.approx(0.0)
    assert FORGET.rms[0, 0].item() == pytest.approx(math.sqrt(14 / 4))
    assert FORGET.std[0, 0].item() == pytest.approx(math.sqrt(14 / 4))  # mean 0
    assert FORGET.sqrt[0, 0].item() == pytest.approx((1 + math.sqrt(3) + math.sqrt(2)) / 4)
    assert FORGET.sample_var[0, 0].item() == pytest.approx(14 / 3)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("abs", (6 / 4) / (2 / 4 + 0.1)),
        ("freq", (2 / 4) / (1 / 4 + 0.1)),
        ("rms", math.sqrt(14 / 4) / (math.sqrt(2 / 4) + 0.1)),
        ("std", math.sqrt(14 / 4) / (math.sqrt(0.5) + 0.1)),  # retain tokens 0,0,1,-1: mean 0, var 0.5
        ("mean", 0.0),
        ("legacy_std", (14 / 3) / (2 / 3 + 0.1)),
        ("legacy_rms", math.sqrt((14 / 3) ** 2) / (math.sqrt((2 / 3) ** 2) + 0.1)),
        # RMS distance from the retain mean (0) on forget, over the retain std
        ("dev", math.sqrt(14 / 4) / (math.sqrt(0.5) + 0.1)),
        # output-aware: both importances times the output weight norm (2 here), eps unscaled
        ("abs_out", (2 * 6 / 4) / (2 * 2 / 4 + 0.1)),
        ("rms_out", 2 * math.sqrt(14 / 4) / (2 * math.sqrt(2 / 4) + 0.1)),
        ("dev_out", 2 * math.sqrt(14 / 4) / (2 * math.sqrt(0.5) + 0.1)),
    ],
)
def test_scores_are_ratio_with_eps(name, expected):
    out_norm = torch.full_like(FORGET.mean, 2.0)
    scores = SCORERS[name](FORGET, RETAIN, 0.1, out_norm)
    assert scores.dtype == torch.float64
    assert scores[0, 0].item() == pytest.approx(expected)


def test_eps_keeps_zero_retain_finite():
    retain = _stats([[0.0, 0.0], [0.0, 0.0]])
    forget = _stats([[1.0, 1.0], [0.0, 0.0]])
    scores = SCORERS["abs"](forget, retain, 1e-3, None)
    assert scores[0, 0].item() == pytest.approx(1000.0) and scores[0, 1].item() == 0.0


def test_required_fields_and_rand():
    assert required_fields("abs") == ("sum_abs",)
    assert required_fields("abs", "std") == ("sum", "sum_abs", "sum_sq")
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = score_neurons("rand", None, None, 0.1, shape=(2, 5), generator=g1)
    b = score_neurons("rand", None, None, 0.1, shape=(2, 5), generator=g2)
    assert torch.equal(a, b) and a.shape == (2, 5)


def test_global_topk_excludes_pruned_and_guards_k0():
    scores = torch.tensor([[5.0, 1.0, 3.0], [4.0, 0.0, 2.0]], dtype=torch.float64)
    keep = torch.tensor([[False, True, True], [True, True, True]])
    sel = select_top_neurons(scores, keep, frac=2 / 6)
    assert sel.chosen.tolist() == [[False, False, False], [True, False, False]] or sel.count == 2
    assert sel.chosen[1, 0] and sel.chosen[0, 2] and not sel.chosen[0, 0]
    assert sel.threshold == 3.0 and sel.per_layer() == [1, 1]
    empty = select_top_neurons(scores, keep, frac=0.1)  # floor(0.6) = 0
    assert empty.count == 0 and empty.threshold is None
    # Never more than what is left, even when every remaining score is zero.
    assert select_top_neurons(torch.zeros(2, 3), keep, frac=1.0).count == 5


def test_head_selection_true_mean_and_median():
    # one layer, 2 heads x 3 dims. head 0: [10, 0, 0] (mean 3.33, median 0); head 1: [2, 2, 2].
    scores = torch.tensor([[10.0, 0.0, 0.0, 2.0, 2.0, 2.0]])
    keep = torch.ones(1, 6, dtype=torch.bool)
    by_mean = select_top_heads(scores, keep, 0.5, n_heads=2, reduce="mean")
    by_median = select_top_heads(scores, keep, 0.5, n_heads=2, reduce="median")
    assert by_mean.chosen.tolist() == [[True, True, True, False, False, False]]
    assert by_median.chosen.tolist() == [[False, False, False, True, True, True]]


def test_random_per_layer_counts_and_seed():
    keep = torch.ones(3, 100, dtype=torch.bool)
    keep[0, :50] = False
    sel = select_random_per_layer(keep, 0.1, torch.Generator().manual_seed(0))
    assert sel.per_layer() == [10, 10, 10]
    assert not (sel.chosen & ~keep).any()
    again = select_random_per_layer(keep, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(sel.chosen, again.chosen)
    heads = select_random_per_layer(
        torch.ones(2, 12, dtype=torch.bool), 0.5, torch.Generator().manual_seed(0), group=4
    )
    # floor(0.5 * 6 heads) = 3 whole heads of 4 dims, spread as evenly as possible over 2 layers
    assert sorted(heads.per_layer()) == [4, 8]
    matched = select_random_per_layer(keep, 0.1, torch.Generator().manual_seed(0), counts=[3, 0, 7])
    assert matched.per_layer() == [3, 0, 7]


def test_dev_measures_distance_from_the_retain_mean():
    # Retain sits at 5 +- 0; forget at 5 too: mean ablation to 5 changes nothing on either set.
    retain = _stats([[5.0, 5.0], [0.0, 0.0]])
    forget = _stats([[5.0, 5.0], [1.0, -1.0]])
    scores = SCORERS["dev"](forget, retain, 1e-3, None)
    assert scores[0, 0].item() == pytest.approx(0.0, abs=1e-9)
    assert scores[0, 1].item() == pytest.approx(1.0 / 1e-3)


def test_per_layer_quota_splits_the_global_count_and_never_rounds_it_away():
    scores = torch.tensor(
        [[1.0, 2.0, 3.0, 4.0], [10.0, 0.5, 0.2, 0.1], [5.0, 6.0, 7.0, 8.0]], dtype=torch.float64
    )
    keep = torch.ones(3, 4, dtype=torch.bool)
    # 0.1 of 4 neurons rounds to 0 per layer, but 0.1 of all 12 is 1: the best next score gets it.
    one = select_top_neurons(scores, keep, 0.1, per_layer=True)
    assert one.count == 1 and bool(one.chosen[1, 0])
    # 7 of 12: 2 per layer, and the 7th goes to the layer whose third-best score is highest.
    seven = select_top_neurons(scores, keep, 7 / 12, per_layer=True)
    assert seven.per_layer() == [2, 2, 3] and seven.threshold == 0.5  # the lowest score selected anywhere
