"""Ground-truth activations in superposition: sparse codes over known feature directions, to test what an SAE
recovers.

    x = Σ_i a_i · f_i (+ ε)          f_i ∈ R^d random unit directions, n_features > d (default 8·d)
    a_i = m_i · 1[feature i fires]   m_i = |μ_i (1 + σ·ξ)|, ξ ~ N(0, 1): noisy magnitudes around a per-feature mean
    P(feature i fires) = p_i ∝ (i + 1)^(−α)                 Zipf, scaled so that Σ_i p_i = mean_active

Options:
- correlated firing: features are split into groups of `group_size`; within a group, firing is decided by
  thresholding correlated Gaussians (correlation ρ = `correlation`) at the quantile that keeps each p_i exact
  (a Gaussian copula);
- hierarchy: the `n_parents` most frequent features are parents, each owning `children_per_parent` further
  features; when a parent fires, one of its children (chosen uniformly) fires with it with probability
  `child_probability`, and a child never fires alone (the setting of Bussmann et al.'s feature-absorption toy);
- dense Gaussian noise of standard deviation `noise_std` on every coordinate.

`recovery_mcc` scores a learned dictionary against the true directions: the mean |cosine| of a one-to-one
(Hungarian) matching.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape and statistics of a synthetic activation source."""

    d: int = 64
    """Width of the activations."""
    n_features: int | None = None
    """True features; None means 8·d (superposition: more features than dimensions)."""
    mean_active: float = 4.0
    """Expected number of firing features per row (sets the Zipf scale)."""
    zipf_exponent: float = 1.0
    """α of the firing probabilities p_i ∝ (i + 1)^(−α); 0 makes every feature equally frequent."""
    magnitude_noise: float = 0.2
    """σ: relative standard deviation of a firing feature's magnitude around its mean."""
    magnitude_range: tuple[float, float] = (0.5, 1.5)
    """Per-feature mean magnitudes μ_i are uniform in this range."""
    correlation: float = 0.0
    """ρ: correlation of the firing of features in the same group (0: independent)."""
    group_size: int = 8
    """Features per correlated group (consecutive feature indices)."""
    n_parents: int = 0
    """Hierarchy: how many of the most frequent features are parents (0: no hierarchy)."""
    children_per_parent: int = 4
    """Hierarchy: children owned by each parent."""
    child_probability: float = 1.0
    """Hierarchy: probability that a firing parent brings one of its children along."""
    noise_std: float = 0.0
    """Standard deviation of dense Gaussian noise on every coordinate."""
    seed: int = 0
    """Seed of the feature directions, probabilities and mean magnitudes (the data itself takes a generator)."""

    def __post_init__(self) -> None:
        n = self.n_features if self.n_features is not None else 8 * self.d
        object.__setattr__(self, "n_features", n)
        if self.d <= 0:
            raise ValueError(f"d must be positive, got {self.d}")
        if n <= self.d:
            raise ValueError(f"n_features must exceed d for superposition, got n_features={n}, d={self.d}")
        if not 0 < self.mean_active < n:
            raise ValueError(f"mean_active must lie in (0, n_features={n}), got {self.mean_active}")
        if self.zipf_exponent < 0 or self.magnitude_noise < 0 or self.noise_std < 0:
            raise ValueError("zipf_exponent, magnitude_noise and noise_std must be >= 0")
        lo, hi = self.magnitude_range
        if not 0 < lo <= hi:
            raise ValueError(f"magnitude_range must satisfy 0 < low <= high, got {self.magnitude_range}")
        if not 0.0 <= self.correlation < 1.0 or self.group_size <= 0:
            raise ValueError(f"correlation must lie in [0, 1) and group_size be positive, got {self.correlation}, "
                             f"{self.group_size}")
        if self.n_parents < 0 or self.children_per_parent <= 0 or not 0 <= self.child_probability <= 1:
            raise ValueError("n_parents must be >= 0, children_per_parent > 0, child_probability in [0, 1]")
        if self.n_parents * (1 + self.children_per_parent) > n:
            raise ValueError(f"{self.n_parents} parents with {self.children_per_parent} children each need "
                             f"{self.n_parents * (1 + self.children_per_parent)} features; n_features={n}")


class SyntheticActivations:
    """Known features and a sampler of activations built from them (see the module docstring)."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        n, d = cfg.n_features, cfg.d
        gen = torch.Generator().manual_seed(cfg.seed)
        features = torch.randn(n, d, generator=gen, dtype=torch.float64)
        self.features = (features / features.norm(dim=1, keepdim=True)).float()  # (F, d) unit rows
        lo, hi = cfg.magnitude_range
        self.mean_magnitude = lo + (hi - lo) * torch.rand(n, generator=gen)  # (F,)
        n_children = cfg.n_parents * cfg.children_per_parent
        # Children are the features right after the parents; parents and the free features share the Zipf ranks.
        self.is_child = torch.zeros(n, dtype=torch.bool)
        self.is_child[cfg.n_parents:cfg.n_parents + n_children] = True
        self.parent_of = torch.full((n,), -1, dtype=torch.long)
        self.parent_of[self.is_child] = torch.arange(cfg.n_parents).repeat_interleave(cfg.children_per_parent)
        free = (~self.is_child).nonzero().squeeze(1)  # (F − children,) in Zipf order
        ranks = torch.arange(len(free), dtype=torch.float64)
        weight = (ranks + 1) ** (-cfg.zipf_exponent)
        # Children fire with their parent, so the parents' share of the budget counts them too.
        carried = torch.ones(len(free), dtype=torch.float64)
        carried[:cfg.n_parents] += cfg.child_probability
        scale = _zipf_scale(weight, carried, cfg.mean_active)
        probs = torch.zeros(n, dtype=torch.float64)
        probs[free] = (scale * weight).clamp(max=1.0)
        child_parents = self.parent_of[self.is_child]
        probs[self.is_child] = probs[child_parents] * cfg.child_probability / cfg.children_per_parent
        self.probabilities = probs.float()  # (F,) marginal firing probabilities
        self._free = free
        self._thresholds = torch.special.ndtri(1 - probs[free].clamp(1e-12, 1 - 1e-12)).float()  # copula cut

    @property
    def n_features(self) -> int:
        """Number of true features."""
        return self.features.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None, with_codes: bool = False,
               chunk_rows: int = 8192) -> Tensor | tuple[Tensor, Tensor]:
        """n rows x (n, d); with_codes also returns the true codes a (n, n_features)."""
        cfg = self.cfg
        xs, codes = [], []
        for start in range(0, n, chunk_rows):
            rows = min(chunk_rows, n - start)
            a = self._codes(rows, generator)  # (rows, F)
            x = a @ self.features
            if cfg.noise_std > 0:
                x = x + cfg.noise_std * torch.randn(x.shape, generator=generator)
            xs.append(x)
            if with_codes:
                codes.append(a)
        x = torch.cat(xs)
        return (x, torch.cat(codes)) if with_codes else x

    def _codes(self, rows: int, generator: torch.Generator | None) -> Tensor:
        """True codes (rows, F): who fires, and how strongly."""
        cfg, free = self.cfg, self._free
        fires = torch.zeros(rows, self.n_features, dtype=torch.bool)
        if cfg.correlation > 0:
            noise = torch.randn(rows, len(free), generator=generator)
            groups = torch.arange(len(free)) // cfg.group_size
            shared = torch.randn(rows, int(groups.max()) + 1, generator=generator)[:, groups]
            noise = math.sqrt(cfg.correlation) * shared + math.sqrt(1 - cfg.correlation) * noise
            fires[:, free] = noise > self._thresholds
        else:
            fires[:, free] = torch.rand(rows, len(free), generator=generator) < self.probabilities[free]
        if cfg.n_parents:
            parents = fires[:, :cfg.n_parents]  # (rows, P)
            bring = parents & (torch.rand(rows, cfg.n_parents, generator=generator) < cfg.child_probability)
            pick = torch.randint(cfg.children_per_parent, (rows, cfg.n_parents), generator=generator)
            child = cfg.n_parents + torch.arange(cfg.n_parents) * cfg.children_per_parent + pick  # (rows, P)
            fires.scatter_(1, child, bring)
        row, col = fires.nonzero(as_tuple=True)
        scale = 1 + cfg.magnitude_noise * torch.randn(len(row), generator=generator)
        codes = torch.zeros(rows, self.n_features)
        codes[row, col] = (self.mean_magnitude[col] * scale).abs()
        return codes


def _zipf_scale(weight: Tensor, carried: Tensor, mean_active: float) -> float:
    """c with Σ_i min(1, c·w_i)·carried_i = mean_active (bisection: the clip at 1 makes it nonlinear)."""
    lo, hi = 0.0, float(mean_active / (weight * carried).sum()) * 2 + 1
    while float((hi * weight).clamp(max=1.0).mul(carried).sum()) < mean_active:
        hi *= 2
        if hi > 1e12:
            raise ValueError(f"mean_active={mean_active} is more than the features can fire")
    for _ in range(100):
        mid = (lo + hi) / 2
        if float((mid * weight).clamp(max=1.0).mul(carried).sum()) < mean_active:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def recovery_mcc(true_features: Tensor, learned: Tensor) -> float:
    """Mean |cosine| between the true features (F, d) and learned directions (L, d) under the one-to-one matching
    that maximises it (Hungarian, scipy's linear_sum_assignment); min(F, L) pairs."""
    from scipy.optimize import linear_sum_assignment

    if true_features.ndim != 2 or learned.ndim != 2 or true_features.shape[1] != learned.shape[1]:
        raise ValueError(f"need (F, d) and (L, d) with the same d, got {tuple(true_features.shape)} and "
                         f"{tuple(learned.shape)}")
    t = true_features.double()
    w = learned.detach().double().cpu()
    cos = (t / t.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)).T  # (F, L)
    score = cos.abs().numpy()
    rows, cols = linear_sum_assignment(score, maximize=True)
    return float(score[rows, cols].mean())
