"""Reconstruction, sparsity and geometry metrics: pure functions on tensors, exact under streaming.

Every streamed metric is a function of sufficient statistics (sums and per-dimension sums of squares) that add
across batches, so evaluating batch by batch gives exactly the full-set value:

    stats = sum((reconstruction_stats(x_b, x̂_b) for each batch b), start=ReconstructionStats.zero(d))
    reconstruction_metrics(stats)  ==  reconstruction_metrics(reconstruction_stats(x_all, x̂_all))

Definitions (x the target activation, x̂ its reconstruction, expectations over tokens, ‖·‖ the L2 norm):

- mse = E‖x − x̂‖² / d  (mean over tokens and dimensions).
- fvu = E‖x − x̂‖² / E‖x − E[x]‖², with E[x] the per-dimension mean over tokens. SAEBench's and SAELens's
  batched explained-variance code subtracts E[x²] (the mean of squares) where the formula needs E[x]; we use the
  per-dimension mean, accumulated exactly as Σx and Σx² per dimension.
- explained_variance = 1 − Σ_d Var(x_d − x̂_d) / Σ_d Var(x_d): the statistician's explained variance, which, unlike
  1 − fvu, does not count a constant offset of the residual (fixable by a bias) as unexplained.
- cosine_similarity = E[cos(x, x̂)] per token; l2_ratio = E[‖x̂‖ / ‖x‖] per token.
- relative_reconstruction_bias γ = E‖x̂‖² / E[x·x̂] (Rajamanoharan et al., SAEBench): the γ minimising
  E‖x̂/γ − x‖²; 1 means unbiased, < 1 means the reconstruction shrinks.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

ACC_DTYPE = torch.float64  # accumulators: float32 sums of ~1e7 squares lose the digits FVU needs
DEFAULT_DENSE_THRESHOLD = 0.1


# -- reconstruction --------------------------------------------------------------------------------------------
class ReconstructionStats(NamedTuple):
    """Additive sufficient statistics of (x, x̂) pairs; combine batches with `+`-like `merge`."""

    n: int  # tokens
    sum_x: Tensor  # (d,) Σ x
    sum_x2: Tensor  # (d,) Σ x²
    sum_r: Tensor  # (d,) Σ (x − x̂)
    sum_r2: Tensor  # (d,) Σ (x − x̂)²
    sum_cos: float  # Σ cos(x, x̂)
    sum_l2_ratio: float  # Σ ‖x̂‖ / ‖x‖
    sum_xhat2: float  # Σ ‖x̂‖²
    sum_x_dot_xhat: float  # Σ x·x̂

    @staticmethod
    def zero(d: int) -> ReconstructionStats:
        """The empty statistics for width d."""
        z = torch.zeros(d, dtype=ACC_DTYPE)
        return ReconstructionStats(0, z, z.clone(), z.clone(), z.clone(), 0.0, 0.0, 0.0, 0.0)

    def merge(self, other: ReconstructionStats) -> ReconstructionStats:
        """Statistics of the union of both token sets."""
        return ReconstructionStats(*(a + b for a, b in zip(self, other)))


def reconstruction_stats(x: Tensor, x_hat: Tensor) -> ReconstructionStats:
    """Sufficient statistics of targets x (N, d) and reconstructions x̂ (N, d)."""
    if x.shape != x_hat.shape or x.ndim != 2:
        raise ValueError(f"x and x_hat must both be (N, d); got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    x = x.detach().to("cpu", ACC_DTYPE)
    x_hat = x_hat.detach().to("cpu", ACC_DTYPE)
    r = x - x_hat
    x_norm = x.norm(dim=1)  # (N,)
    xh_norm = x_hat.norm(dim=1)  # (N,)
    tiny = torch.finfo(ACC_DTYPE).tiny
    dot = (x * x_hat).sum(dim=1)  # (N,)
    return ReconstructionStats(
        n=x.shape[0],
        sum_x=x.sum(0), sum_x2=x.pow(2).sum(0), sum_r=r.sum(0), sum_r2=r.pow(2).sum(0),
        sum_cos=float((dot / (x_norm * xh_norm).clamp_min(tiny)).sum()),
        sum_l2_ratio=float((xh_norm / x_norm.clamp_min(tiny)).sum()),
        sum_xhat2=float(xh_norm.pow(2).sum()),
        sum_x_dot_xhat=float(dot.sum()),
    )


def _safe_div(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def reconstruction_metrics(stats: ReconstructionStats) -> dict[str, float]:
    """mse, fvu, explained_variance, cosine_similarity, l2_ratio, relative_reconstruction_bias (module docstring)."""
    n = stats.n
    if n == 0:
        raise ValueError("no tokens were accumulated: cannot compute reconstruction metrics")
    d = stats.sum_x.numel()
    # Σ_d Σ_t (x − mean)² = Σx² − (Σx)²/n per dimension: the per-dimension mean, not E[x²].
    total_var = float((stats.sum_x2 - stats.sum_x.pow(2) / n).sum())
    resid_sq = float(stats.sum_r2.sum())
    resid_var = float((stats.sum_r2 - stats.sum_r.pow(2) / n).sum())
    fvu = _safe_div(resid_sq, total_var)
    return {
        "mse": resid_sq / (n * d),
        "fvu": fvu,
        "explained_variance": 1.0 - _safe_div(resid_var, total_var),
        "cosine_similarity": stats.sum_cos / n,
        "l2_ratio": stats.sum_l2_ratio / n,
        "relative_reconstruction_bias": _safe_div(stats.sum_xhat2, stats.sum_x_dot_xhat),
    }


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """E‖x−x̂‖² / E‖x−E[x]‖² with the per-dimension mean E[x] (not E[x²] as SAEBench/SAELens batched code)."""
    return reconstruction_metrics(reconstruction_stats(x, x_hat))["fvu"]


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 − Σ_d Var(x_d − x̂_d) / Σ_d Var(x_d)."""
    return reconstruction_metrics(reconstruction_stats(x, x_hat))["explained_variance"]


def cosine_similarity(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of cos(x, x̂)."""
    return reconstruction_metrics(reconstruction_stats(x, x_hat))["cosine_similarity"]


def l2_ratio(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of ‖x̂‖ / ‖x‖."""
    return reconstruction_metrics(reconstruction_stats(x, x_hat))["l2_ratio"]


def relative_reconstruction_bias(x: Tensor, x_hat: Tensor) -> float:
    """γ = E‖x̂‖² / E[x·x̂]: 1 unbiased, below 1 shrunk reconstructions."""
    return reconstruction_metrics(reconstruction_stats(x, x_hat))["relative_reconstruction_bias"]


# -- sparsity --------------------------------------------------------------------------------------------------
class SparsityStats(NamedTuple):
    """Additive sparsity statistics: bounded by d_sae, never by the number of tokens."""

    n: int  # tokens
    fire_counts: Tensor  # (d_sae,) int64: tokens on which each latent was non-zero
    l0_counts: Tensor  # (max_l0 + 1,) int64: tokens with exactly that many active latents

    @staticmethod
    def zero(d_sae: int) -> SparsityStats:
        """The empty statistics for d_sae latents."""
        return SparsityStats(0, torch.zeros(d_sae, dtype=torch.long), torch.zeros(1, dtype=torch.long))

    def merge(self, other: SparsityStats) -> SparsityStats:
        """Statistics of the union of both token sets (L0 histograms padded to the longer one)."""
        size = max(self.l0_counts.numel(), other.l0_counts.numel())
        a = torch.nn.functional.pad(self.l0_counts, (0, size - self.l0_counts.numel()))
        b = torch.nn.functional.pad(other.l0_counts, (0, size - other.l0_counts.numel()))
        return SparsityStats(self.n + other.n, self.fire_counts + other.fire_counts, a + b)


def sparsity_stats(latents: Tensor) -> SparsityStats:
    """Fire counts and L0 histogram of dense latent activations (N, d_sae); a latent fires where it is non-zero."""
    if latents.ndim != 2:
        raise ValueError(f"latents must be (N, d_sae), got shape {tuple(latents.shape)}")
    fired = latents.detach() != 0  # (N, d_sae); != 0, not > 0, so AbsTopK's negative activations count
    l0 = fired.sum(dim=1)  # (N,)
    return SparsityStats(latents.shape[0], fired.sum(dim=0).cpu().long(), torch.bincount(l0.cpu()).long())


def mean_l0(stats: SparsityStats) -> float:
    """Mean number of active latents per token."""
    values = torch.arange(stats.l0_counts.numel(), dtype=ACC_DTYPE)
    return float((values * stats.l0_counts).sum()) / stats.n if stats.n else math.nan


def latent_frequencies(stats: SparsityStats) -> Tensor:
    """(d_sae,) fraction of tokens on which each latent fired."""
    return stats.fire_counts.to(ACC_DTYPE) / max(stats.n, 1)


def dead_mask(stats: SparsityStats) -> Tensor:
    """(d_sae,) True for latents that never fired over the accumulated tokens."""
    return stats.fire_counts == 0


def dense_mask(stats: SparsityStats, threshold: float = DEFAULT_DENSE_THRESHOLD) -> Tensor:
    """(d_sae,) True for latents firing on more than `threshold` of tokens (default 10%)."""
    if not 0 < threshold < 1:
        raise ValueError(f"dense threshold must be in (0, 1), got {threshold}")
    return latent_frequencies(stats) > threshold


def latent_density_histogram(stats: SparsityStats, bin_width: float = 0.1) -> tuple[Tensor, Tensor, int]:
    """Histogram of log10(firing frequency) over live latents: (bin edges, counts, number of dead latents).

    Bins are aligned to multiples of `bin_width` and span [floor(min), 0]; dead latents have log10(0) = −∞ and
    are returned as a count instead.
    """
    if bin_width <= 0:
        raise ValueError(f"bin_width must be positive, got {bin_width}")
    freq = latent_frequencies(stats)
    live = freq[freq > 0]
    n_dead = int((freq == 0).sum())
    if live.numel() == 0:
        return torch.tensor([0.0]), torch.zeros(0, dtype=torch.long), n_dead
    logf = live.log10()
    lo = math.floor(float(logf.min()) / bin_width) * bin_width
    n_bins = max(1, math.ceil(round(-lo / bin_width, 9)))
    edges = lo + bin_width * torch.arange(n_bins + 1, dtype=ACC_DTYPE)
    # bin i holds [edges[i], edges[i+1]); log10(1) = 0 falls in the last bin
    idx = ((logf - lo) / bin_width + 1e-9).floor().long().clamp(0, n_bins - 1)
    return edges, torch.bincount(idx, minlength=n_bins), n_dead


def sparsity_metrics(stats: SparsityStats, dense_threshold: float = DEFAULT_DENSE_THRESHOLD) -> dict[str, float]:
    """l0, dead_fraction, dense_fraction and their counts."""
    if stats.n == 0:
        raise ValueError("no tokens were accumulated: cannot compute sparsity metrics")
    d_sae = stats.fire_counts.numel()
    dead = int(dead_mask(stats).sum())
    dense = int(dense_mask(stats, dense_threshold).sum())
    return {
        "l0": mean_l0(stats),
        "dead_fraction": dead / d_sae, "dead_count": dead,
        "dense_fraction": dense / d_sae, "dense_count": dense,
    }


# -- geometry --------------------------------------------------------------------------------------------------
def _unit_rows(w: Tensor) -> Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def max_decoder_cosine(W_dec: Tensor, chunk_size: int = 1024) -> Tensor:
    """(d_sae,) for each decoder direction, its largest cosine with any other; memory O(chunk_size · d_sae)."""
    if W_dec.ndim != 2 or W_dec.shape[0] < 2:
        raise ValueError(f"W_dec must be (d_sae ≥ 2, d_out), got shape {tuple(W_dec.shape)}")
    w = _unit_rows(W_dec.detach().float())  # (d_sae, d_out)
    out = torch.empty(w.shape[0])
    for start in range(0, w.shape[0], chunk_size):
        sims = w[start:start + chunk_size] @ w.T  # (chunk, d_sae)
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = -math.inf  # a direction against itself is not "another"
        out[start:start + sims.shape[0]] = sims.max(dim=1).values.cpu()
    return out


def encoder_decoder_cosine(W_enc: Tensor, W_dec: Tensor) -> Tensor:
    """(d_sae,) cosine between each latent's encoder column W_enc[:, i] and decoder row W_dec[i]."""
    if W_enc.shape[0] != W_dec.shape[1] or W_enc.shape[1] != W_dec.shape[0]:
        raise ValueError(
            f"encoder {tuple(W_enc.shape)} and decoder {tuple(W_dec.shape)} live in different spaces "
            "(d_in ≠ d_out): no encoder–decoder cosine"
        )
    return (_unit_rows(W_enc.detach().float().T) * _unit_rows(W_dec.detach().float())).sum(dim=1).cpu()


# -- downstream (pure pieces; the splice lives in evals.downstream) ---------------------------------------------
def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """(B, P−1) cross-entropy of predicting tokens[:, 1:] from logits[:, :-1] (B, P, V)."""
    logp = logits[:, :-1].float().log_softmax(dim=-1)  # (B, P−1, V)
    return -logp.gather(-1, tokens[:, 1:, None].to(logits.device)).squeeze(-1)


def kl_divergence(clean_logits: Tensor, logits: Tensor) -> Tensor:
    """(B, P) KL(p_clean ‖ p) per position, in nats."""
    clean = clean_logits.float().log_softmax(dim=-1)
    other = logits.float().log_softmax(dim=-1)
    return (clean.exp() * (clean - other)).sum(dim=-1)


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_ablation: float) -> float:
    """(CE_ablation − CE_sae) / (CE_ablation − CE_clean): 1 for a perfect splice, 0 for one as bad as ablation."""
    return _safe_div(ce_ablation - ce_sae, ce_ablation - ce_clean)


def kl_score(kl_sae: float, kl_ablation: float) -> float:
    """(KL_ablation − KL_sae) / KL_ablation: 1 when the splice matches the clean model, 0 at the ablation."""
    return _safe_div(kl_ablation - kl_sae, kl_ablation)


# -- sweeps ----------------------------------------------------------------------------------------------------
def pareto_frontier(l0: list[float], values: list[float], higher_is_better: bool = False) -> list[int]:
    """Indices of the Pareto-optimal points (lower L0 and better value), sorted by L0."""
    if len(l0) != len(values):
        raise ValueError(f"l0 and values differ in length: {len(l0)} vs {len(values)}")
    sign = -1.0 if higher_is_better else 1.0
    order = sorted((i for i in range(len(l0)) if not (math.isnan(l0[i]) or math.isnan(values[i]))),
                   key=lambda i: (l0[i], sign * values[i]))
    front: list[int] = []
    best = math.inf
    for i in order:  # ascending L0: a point is on the frontier if it beats every lower-L0 point
        if sign * values[i] < best:
            front.append(i)
            best = sign * values[i]
    return front


def sweep_frontiers(records: list[dict], key: str, higher_is_better: bool = False) -> dict[str, list[int]]:
    """Per hook point (SAEs on different points are not comparable), indices of the L0–`key` Pareto records."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        point = r.get("hook_point", "")
        if r.get("target_hook_point"):
            point = f"{point} → {r['target_hook_point']}"
        groups.setdefault(point, []).append(i)

    def num(v: object) -> float:
        return float(v) if isinstance(v, int | float) else math.nan

    return {
        point: [idx[j] for j in pareto_frontier([num(records[i].get("l0")) for i in idx],
                                                [num(records[i].get(key)) for i in idx], higher_is_better)]
        for point, idx in groups.items()
    }
