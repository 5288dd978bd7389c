"""Sparse probing (SAEBench's protocol): how few latents carry each concept.

For each binary task (`evals.tasks`), on its balanced train split:

1. rank the features (SAE latents, or raw activation dimensions) by |mean over positives − mean over negatives|
   (`mean_difference_ranking`; SAEBench's `get_top_k_mean_diff_mask`);
2. fit a logistic regression on the top-k features, for k in `ks` (default 1, 2, 5, 10, 20): scikit-learn's L2
   `LogisticRegression(C=1)` on the unscaled features, SAEBench's `train_sklearn_probe` objective; we solve it with
   the `newton-cholesky` solver, which reaches the optimum in a few Newton steps where SAEBench's lbfgs needs
   hundreds on raw activations (and may stop at max_iter=1000 before it);
3. report accuracy and F1 (positive class) on the task's balanced test split.

Features of an example are its activations averaged over the example's positions (one token for the code concepts;
a text's tokens for hub datasets): SAE latents are encoded per token, then averaged, as SAEBench does. SAE latents
are read with the decoder norms folded in (z_i·‖d_i‖, `evals.tasks.fold_decoder_norms`), as SAEBench requires of
its SAEs, so the ranking and the L2 probe see the SAE's function, not how it splits scale between z and W_dec.

Baselines, on the same examples: the same top-k probe on the raw activations (SAEBench's `llm_top_k`), a probe on
all raw dimensions (SAEBench's `llm_test_accuracy`; we fit it with the same scikit-learn regression rather than
SAEBench's Adam loop with early stopping on the test set), and the control: the same protocol on an SAE with
random directions of the same per-latent norms (`evals.controls.random_directions_like`). The trained SAE beats the
control when the mean top-1 accuracy over tasks is higher; `paired_difference_ci` gives a percentile bootstrap CI
of that difference over tasks (scipy.stats.bootstrap), with NaN bounds when fewer than two tasks ran.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from evals.controls import random_directions_like
from evals.tasks import ProbeTask, TaskSet, check_reads, fold_decoder_norms, pooled, pooled_latents

DEFAULT_KS = (1, 2, 5, 10, 20)


class ProbeScore(NamedTuple):
    """Test-set quality of one probe."""

    accuracy: float
    f1: float


@dataclass(frozen=True)
class ProbingConfig:
    """Settings of the sparse-probing suite."""

    ks: tuple[int, ...] = DEFAULT_KS
    """Numbers of top-ranked features each probe reads."""
    control_seed: int = 0
    """Seed of the random-direction control SAE."""
    n_resamples: int = 10_000
    """Bootstrap resamples for the confidence interval of the SAE − control difference."""
    confidence: float = 0.95
    """Confidence level of that interval."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(sorted({int(k) for k in self.ks})))
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"ks must be positive integers, got {list(self.ks)}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.n_resamples < 100:
            raise ValueError(f"n_resamples must be at least 100, got {self.n_resamples}")


def check_binary(y: Tensor, what: str) -> None:
    """ValueError unless y holds both classes 0 and 1 and nothing else."""
    values = set(torch.unique(y).tolist())
    if values != {0, 1}:
        raise ValueError(f"{what} needs labels 0 and 1, got classes {sorted(values)}: a task with one class "
                         "cannot be probed")


def mean_difference_ranking(x: Tensor, y: Tensor) -> Tensor:
    """(F,) feature indices sorted by |mean(x | y=1) − mean(x | y=0)|, largest first (ties: lower index first)."""
    check_binary(y, "ranking features")
    x = x.double()
    diff = (x[y == 1].mean(0) - x[y == 0].mean(0)).abs()  # (F,)
    return torch.sort(diff, descending=True, stable=True).indices


def fit_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor) -> ProbeScore:
    """Logistic regression (L2, C=1, unscaled features, newton-cholesky) fit on train, scored on test."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    check_binary(y_train, "the probe's train split")
    check_binary(y_test, "the probe's test split")
    xt, yt = x_train.double().numpy(), y_train.numpy()
    with warnings.catch_warnings():
        # separable data (a perfect latent) has no finite optimum; the probe at max_iter still scores it
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe = LogisticRegression(C=1.0, solver="newton-cholesky", max_iter=1000).fit(xt, yt)
    pred = probe.predict(x_test.double().numpy())
    return ProbeScore(float(accuracy_score(y_test.numpy(), pred)),
                      float(f1_score(y_test.numpy(), pred, zero_division=0.0)))


def sparse_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
                 ks: Sequence[int] = DEFAULT_KS) -> tuple[list[ProbeScore], Tensor]:
    """Scores of top-k probes for each k (features ranked on train), and the ranking's first max(ks) features."""
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train and test features differ in width: {x_train.shape[1]} vs {x_test.shape[1]}")
    ranking = mean_difference_ranking(x_train, y_train)
    scores = []
    for k in ks:
        top = ranking[: min(k, ranking.numel())]
        scores.append(fit_probe(x_train[:, top], y_train, x_test[:, top], y_test))
    return scores, ranking[: max(ks)]


def paired_difference_ci(a: Sequence[float], b: Sequence[float], n_resamples: int = 10_000,
                         confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """mean(a − b) over paired items and its percentile bootstrap CI (resampling the pairs); NaN bounds with fewer
    than 2 finite pairs."""
    from scipy.stats import bootstrap

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    out = {"difference": float(d.mean()) if len(d) else math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "n": int(len(d))}
    if len(d) >= 2 and np.ptp(d) > 0:
        res = bootstrap((d,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                        random_state=np.random.default_rng(seed))
        out["ci_low"], out["ci_high"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
    elif len(d) >= 2:  # every pair differs by the same amount: each resample's mean is that point
        out["ci_low"] = out["ci_high"] = out["difference"]
    # one pair (or none): no spread to resample, so no interval; the bounds stay NaN (null in metrics.json,
    # n/a in the report), never a zero-width interval that reads as "excludes 0"
    return out


def _scores_record(scores: list[ProbeScore]) -> dict[str, list[float]]:
    return {"accuracy": [s.accuracy for s in scores], "f1": [s.f1 for s in scores]}


def probe_raw(task: ProbeTask, ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """Raw-activation baselines of one task: top-k probes and the probe on every dimension."""
    x_tr, x_te = pooled(task.train), pooled(task.test)
    scores, top = sparse_probe(x_tr, task.train.labels, x_te, task.test.labels, ks)
    full = fit_probe(x_tr, task.train.labels, x_te, task.test.labels)
    return {**_scores_record(scores), "full_accuracy": full.accuracy, "full_f1": full.f1,
            "top_dimensions": top.tolist()}


def probe_sae(task: ProbeTask, sae: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """Top-k probes of one task on an SAE's latents (averaged over each example's positions)."""
    # unit-decoder units: the ranking and the L2 probe would otherwise depend on how the SAE splits scale between
    # z and W_dec (averaging over positions commutes with the per-latent factor)
    z_tr = fold_decoder_norms(sae, pooled_latents(sae, task.train)).z
    z_te = fold_decoder_norms(sae, pooled_latents(sae, task.test)).z
    scores, top = sparse_probe(z_tr, task.train.labels, z_te, task.test.labels, ks)
    return {**_scores_record(scores), "top_latents": top.tolist()}


def _means(per_task: dict[str, dict[str, Any]], key: str, n_k: int) -> list[float]:
    return [float(np.mean([r[key][i] for r in per_task.values()])) for i in range(n_k)]


def run_probing(tasks: TaskSet, saes: Sequence[tuple[str, Any]], cfg: ProbingConfig = ProbingConfig(),
                progress: bool = False) -> dict[str, Any]:
    """The probing section of metrics.json: raw baselines once, then each (label, SAE) and its random control."""
    if not tasks.tasks:
        raise ValueError("no probing tasks to run")
    for label, sae in saes:
        check_reads(sae, tasks.hook_point, f"the probing examples (for SAE {label!r})")
    ks = list(cfg.ks)
    bar = tqdm(total=len(tasks.tasks) * (1 + 2 * len(saes)), desc="sparse probing", unit="probe set",
               disable=not progress)
    raw: dict[str, dict[str, Any]] = {}
    for task in tasks.tasks:
        raw[task.name] = probe_raw(task, ks)
        bar.update()
    out: dict[str, Any] = {
        "hook_point": tasks.hook_point, "source": tasks.source, "k": ks, "tasks": tasks.manifest(),
        "raw": {"by_task": raw, "mean_accuracy": _means(raw, "accuracy", len(ks)),
                "mean_f1": _means(raw, "f1", len(ks)),
                "mean_full_accuracy": float(np.mean([r["full_accuracy"] for r in raw.values()])),
                "tasks_full_accuracy_at_least_0.9": sum(r["full_accuracy"] >= 0.9 for r in raw.values())},
        "saes": [],
    }
    for label, sae in saes:
        control = random_directions_like(sae, seed=cfg.control_seed)
        rec: dict[str, Any] = {"sae_path": label}
        for key, model in (("sae", sae), ("control", control)):
            per_task = {}
            for task in tasks.tasks:
                per_task[task.name] = probe_sae(task, model, ks)
                bar.update()
            rec[key] = {"by_task": per_task, "mean_accuracy": _means(per_task, "accuracy", len(ks)),
                        "mean_f1": _means(per_task, "f1", len(ks))}
        names = [t.name for t in tasks.tasks]
        rec["vs_control"] = paired_difference_ci(
            [rec["sae"]["by_task"][n]["accuracy"][0] for n in names],
            [rec["control"]["by_task"][n]["accuracy"][0] for n in names],
            cfg.n_resamples, cfg.confidence, seed=cfg.control_seed)
        rec["vs_control"]["k"] = ks[0]
        out["saes"].append(rec)
    bar.close()
    return out
