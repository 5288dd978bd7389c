"""Feature consistency: do two SAEs trained alike (e.g. with seeds 0 and 1) find the same latents?

Following "Mechanistic Interpretability Should Prioritize Feature Consistency in SAEs" (pairwise dictionary mean
correlation coefficient): match the latents of SAE A one-to-one with those of SAE B by the Hungarian algorithm
(scipy's `linear_sum_assignment`) on |cos| between their decoder directions, maximising the total, then report

- `mcc`: the mean |cos| over the matched pairs;
- `share_above_0.9`, `share_above_0.7`: the share of latents whose match has |cos| above that;
- a histogram of the matched |cos| (20 bins over [0, 1]) for the report.

Only SAEs of the same width on the same hook point (and input width) are compared; anything else is a ValueError.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from torch import Tensor

THRESHOLDS = (0.9, 0.7)
HISTOGRAM_BINS = 20


class Matching(NamedTuple):
    """A one-to-one matching of latents."""

    rows: np.ndarray  # (d_sae,) latents of A
    cols: np.ndarray  # (d_sae,) their matches in B
    abs_cos: np.ndarray  # (d_sae,) |cos| of each matched pair


def abs_decoder_cosines(w_a: Tensor, w_b: Tensor) -> Tensor:
    """(d_a, d_b) |cos| between every decoder row of A (d_a, d) and of B (d_b, d), in float64."""
    if w_a.ndim != 2 or w_b.ndim != 2 or w_a.shape[1] != w_b.shape[1]:
        raise ValueError(f"decoders must be (d_sae, d) with the same d; got {tuple(w_a.shape)} and {tuple(w_b.shape)}")
    a = w_a.detach().double().cpu()
    b = w_b.detach().double().cpu()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).abs()


def match_latents(w_a: Tensor, w_b: Tensor) -> Matching:
    """The one-to-one matching maximising the total |cos| between decoder directions (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    sims = abs_decoder_cosines(w_a, w_b).numpy()
    rows, cols = linear_sum_assignment(sims, maximize=True)
    return Matching(rows, cols, sims[rows, cols])


def check_comparable(a: Any, b: Any, labels: Sequence[str] = ("A", "B")) -> None:
    """ValueError unless both SAEs have the same width, input width and hook point."""
    ca, cb = a.cfg, b.cfg
    la, lb = labels
    if ca.hook_point != cb.hook_point:
        raise ValueError(f"consistency compares SAEs on one hook point: {la} reads {ca.hook_point!r}, {lb} reads "
                         f"{cb.hook_point!r}")
    if ca.d_sae != cb.d_sae:
        raise ValueError(f"consistency compares SAEs of one width: {la} has d_sae={ca.d_sae}, {lb} has "
                         f"d_sae={cb.d_sae} (a one-to-one matching needs equal latent counts)")
    if ca.d_in != cb.d_in or ca.d_target != cb.d_target:
        raise ValueError(f"{la} maps {ca.d_in}→{ca.d_target} and {lb} maps {cb.d_in}→{cb.d_target}: not comparable")


def consistency(a: Any, b: Any, labels: Sequence[str] = ("A", "B"),
                thresholds: Sequence[float] = THRESHOLDS) -> dict[str, Any]:
    """MCC and shares above thresholds of the Hungarian matching of two SAEs' decoders (module docstring)."""
    check_comparable(a, b, labels)
    m = match_latents(a.W_dec, b.W_dec)
    hist, edges = np.histogram(m.abs_cos, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    out: dict[str, Any] = {"a": labels[0], "b": labels[1], "hook_point": a.cfg.hook_point, "d_sae": a.cfg.d_sae,
                           "mcc": float(m.abs_cos.mean())}
    for t in thresholds:
        out[f"share_above_{t:g}"] = float((m.abs_cos > t).mean())
    out["histogram"] = {"edges": edges.tolist(), "counts": hist.tolist()}
    return out


def run_consistency(saes: Sequence[tuple[str, Any]], strict: bool = True) -> dict[str, Any]:
    """The consistency section of metrics.json: every pair of the given SAEs (in order).

    strict: a pair of different widths or hook points is a ValueError; otherwise it is listed under `skipped` with
    the reason (a sweep of widths still compares its equal-width pairs), and ValueError only if no pair is left.
    """
    if len(saes) < 2:
        raise ValueError(f"consistency needs at least two SAEs, got {len(saes)}")
    pairs, skipped = [], []
    for i in range(len(saes)):
        for j in range(i + 1, len(saes)):
            (la, a), (lb, b) = saes[i], saes[j]
            try:
                pairs.append(consistency(a, b, (la, lb)))
            except ValueError as err:
                if strict:
                    raise
                skipped.append({"a": la, "b": lb, "reason": str(err)})
    if not pairs:
        raise ValueError("no pair of SAEs is comparable for consistency: " + "; ".join(s["reason"] for s in skipped))
    return {"pairs": pairs, "skipped": skipped, "thresholds": list(THRESHOLDS)}
