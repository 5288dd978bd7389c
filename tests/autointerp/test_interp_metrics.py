"""Metrics against hand-computed values, and latent-spec parsing."""
from __future__ import annotations

import math
import random

import pytest

from autointerp.metrics import (
    aggregate,
    auroc,
    binary_metrics,
    bootstrap_ci,
    bootstrap_diff_ci,
    top_n_predictions,
)
from autointerp.spec import parse_latent_spec, sample_live


def test_binary_metrics_hand_computed():
    # preds 1 1 0 0 1 vs labels 1 0 0 1 1: tp=2 fp=1 tn=1 fn=1
    m = binary_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_binary_metrics_degenerate_cases():
    m = binary_metrics([0, 0], [1, 1])
    assert m["f1"] == 0 and m["recall"] == 0 and math.isnan(m["precision"]) and math.isnan(m["balanced_accuracy"])
    with pytest.raises(ValueError, match="differ in length"):
        binary_metrics([1], [1, 0])


def test_auroc_hand_computed_with_ties():
    # positives 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9>0.5)=1 (0.9>0.1)=1 (0.5=0.5)=½ (0.5>0.1)=1 → 3.5/4
    assert auroc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)
    assert auroc([0.1, 0.2, 0.3], [1, 0, 0]) == 0.0
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_top_n_predictions_and_bootstrap():
    assert top_n_predictions([0.1, 0.9, 0.5, 0.7], 2) == [0, 1, 0, 1]
    lo, hi = bootstrap_ci([0.5, 0.6, 0.7, 0.8, 0.9], n_resamples=500)
    assert lo < 0.7 < hi
    assert bootstrap_ci([1.0, 1.0, float("nan")]) == (1.0, 1.0)
    agg = aggregate([{"auroc": 0.8, "n": 3}, {"auroc": 0.6}, {"auroc": float("nan")}])
    assert agg["auroc"]["mean"] == pytest.approx(0.7) and agg["auroc"]["n"] == 2 and "n" not in agg


def test_top_n_predictions_breaks_ties_without_favouring_the_first_items():
    # Scorers list positives first: a judge whose scores are all equal must not score perfect accuracy.
    labels = [1] * 50 + [0] * 50
    assert 0.3 < binary_metrics(top_n_predictions([0.5] * 100, 50), labels)["accuracy"] < 0.7
    assert sum(top_n_predictions([0.2, 0.5, 0.5, 0.5, 0.1], 2)) == 2
    assert top_n_predictions([0.2, 0.5, 0.5, 0.5, 0.1], 3) == [0, 1, 1, 1, 0]


def test_spec_forms():
    assert parse_latent_spec("0:4", 10).indices == (0, 1, 2, 3)
    assert parse_latent_spec("3,7,3", 10).indices == (3, 7)
    assert parse_latent_spec("random:5", 10).n_random == 5
    assert parse_latent_spec(":3", 10).indices == (0, 1, 2)


@pytest.mark.parametrize("spec,match", [
    ("0:11", "out of bounds"), ("5:2", "out of bounds"), ("3,10", r"\[10\] out of range"), ("-1", "out of range"),
    ("random:0", "random sample size"), ("random:11", "random sample size"), ("abc", "cannot parse"), ("", "empty"),
])
def test_spec_errors_name_the_bad_value(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_latent_spec(spec, 10)


def test_sample_live_is_seeded_and_only_live():
    live = list(range(0, 100, 3))
    a, b = sample_live(live, 5, seed=1), sample_live(live, 5, seed=1)
    assert a == b and set(a) <= set(live) and len(a) == 5
    assert sample_live([4, 2], 5, seed=0) == [2, 4]


def test_bootstrap_diff_ci_separates_shifted_samples_only():
    rng = random.Random(0)
    a = [0.65 + rng.gauss(0, 0.1) for _ in range(200)]
    b = [0.55 + rng.gauss(0, 0.1) for _ in range(200)]
    c = [0.55 + rng.gauss(0, 0.1) for _ in range(200)]
    lo, hi = bootstrap_diff_ci(a, b)
    assert 0.05 < lo < 0.1 < hi < 0.15
    lo, hi = bootstrap_diff_ci(b, c)
    assert lo < 0 < hi
    assert all(math.isnan(v) for v in bootstrap_diff_ci([], [0.5]))


def test_bootstrap_ci_of_fewer_than_two_values_is_undefined():
    assert all(math.isnan(v) for v in bootstrap_ci([0.7]))
    assert all(math.isnan(v) for v in bootstrap_ci([0.7, float("nan"), None]))
    row = aggregate([{"auroc": 0.7}])["auroc"]
    assert row["mean"] == 0.7 and row["n"] == 1 and math.isnan(row["ci_low"]) and math.isnan(row["ci_high"])
