"""Pure scoring metrics: binary classification metrics, AUROC and bootstrap confidence intervals.

Every function takes plain sequences (or tensors) of labels / predictions / scores and returns floats;
undefined values (no positives, no negatives) are NaN rather than an exception, so one degenerate latent
never crashes a run, and aggregation skips NaNs.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

NAN = float("nan")


def _ints(xs: Sequence[int | bool | float]) -> list[int]:
    return [int(bool(x)) for x in xs]


def binary_metrics(predictions: Sequence[int | bool], labels: Sequence[int | bool]) -> dict[str, float]:
    """Accuracy, balanced accuracy, precision, recall and F1 of 0/1 predictions against 0/1 labels."""
    if len(predictions) != len(labels):
        raise ValueError(f"predictions ({len(predictions)}) and labels ({len(labels)}) differ in length")
    p, y = _ints(predictions), _ints(labels)
    tp = sum(1 for a, b in zip(p, y, strict=True) if a and b)
    tn = sum(1 for a, b in zip(p, y, strict=True) if not a and not b)
    fp = sum(1 for a, b in zip(p, y, strict=True) if a and not b)
    fn = sum(1 for a, b in zip(p, y, strict=True) if not a and b)
    n = len(y)
    accuracy = (tp + tn) / n if n else NAN
    recall = tp / (tp + fn) if tp + fn else NAN
    specificity = tn / (tn + fp) if tn + fp else NAN
    precision = tp / (tp + fp) if tp + fp else NAN
    if math.isnan(recall) or math.isnan(specificity):
        balanced = NAN
    else:
        balanced = (recall + specificity) / 2
    if math.isnan(precision) or math.isnan(recall) or precision + recall == 0:
        # No predicted positives but real ones exist: F1 is 0 by the usual convention.
        f1 = 0.0 if tp + fn and not math.isnan(recall) else NAN
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "accuracy": accuracy, "balanced_accuracy": balanced, "precision": precision, "recall": recall, "f1": f1,
        "n": float(n), "n_positive": float(tp + fn),
    }


def auroc(scores: Sequence[float], labels: Sequence[int | bool]) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties counting ½."""
    if len(scores) != len(labels):
        raise ValueError(f"scores ({len(scores)}) and labels ({len(labels)}) differ in length")
    y = _ints(labels)
    n_pos, n_neg = sum(y), len(y) - sum(y)
    if n_pos == 0 or n_neg == 0:
        return NAN
    # Mann–Whitney U via average ranks: O(n log n) and exact with ties.
    order = sorted(range(len(scores)), key=lambda i: float(scores[i]))
    ranks = [0.0] * len(order)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and float(scores[order[j + 1]]) == float(scores[order[i]]):
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, lab in zip(ranks, y, strict=True) if lab)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def top_n_predictions(scores: Sequence[float], n_positive: int, seed: int = 0) -> list[int]:
    """Turn graded scores into 0/1 by calling the n_positive highest-scoring items positive (ties in a seeded
    random order)."""
    # Scorers list positives first: breaking ties by position would call tied positives positive, so a judge that
    # cannot tell the classes apart (every score equal) would score perfect accuracy.
    tiebreak = list(range(len(scores)))
    random.Random(seed).shuffle(tiebreak)
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), tiebreak[i]))
    chosen = set(order[:n_positive])
    return [int(i in chosen) for i in range(len(scores))]


def finite(values: Sequence[float | None]) -> list[float]:
    """The values that are real numbers (drops None and NaN)."""
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean(values: Sequence[float | None]) -> float:
    """Mean of the finite values, NaN when there are none."""
    vals = finite(values)
    return sum(vals) / len(vals) if vals else NAN


def _percentile_interval(stats: list[float], confidence: float) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap statistics (percentile method)."""
    stats = sorted(stats)
    n = len(stats)
    return (stats[int(math.floor((1 - confidence) / 2 * (n - 1)))],
            stats[int(math.ceil((1 + confidence) / 2 * (n - 1)))])


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_ci(
    values: Sequence[float | None], n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of the finite values (NaN, NaN with fewer than two)."""
    _check_confidence(confidence)
    vals = finite(values)
    if len(vals) < 2:  # one value resamples to itself: a zero-width interval would pass for certainty
        return NAN, NAN
    rng = random.Random(seed)
    n = len(vals)
    return _percentile_interval([sum(rng.choice(vals) for _ in range(n)) / n for _ in range(n_resamples)], confidence)


def bootstrap_diff_ci(
    a: Sequence[float | None], b: Sequence[float | None], n_resamples: int = 1000, confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(a) − mean(b) for two independent samples (finite values; NaNs if empty)."""
    _check_confidence(confidence)
    va, vb = finite(a), finite(b)
    if not va or not vb:
        return NAN, NAN
    rng = random.Random(seed)
    diffs = [sum(rng.choices(va, k=len(va))) / len(va) - sum(rng.choices(vb, k=len(vb))) / len(vb)
             for _ in range(n_resamples)]
    return _percentile_interval(diffs, confidence)


def aggregate(per_latent: Sequence[dict[str, float]], seed: int = 0) -> dict[str, dict[str, float]]:
    """For each metric name: mean, bootstrap 95% CI and the number of latents with a finite value."""
    names = sorted({k for row in per_latent for k in row if k not in ("n", "n_positive", "positives_short")})
    out: dict[str, dict[str, float]] = {}
    for name in names:
        vals = finite([row.get(name) for row in per_latent])
        lo, hi = bootstrap_ci(vals, seed=seed)
        out[name] = {"mean": mean(vals), "ci_low": lo, "ci_high": hi, "n": len(vals)}
    return out
