"""Geometric median by Weiszfeld iterations: the b_dec initialisation of Gao et al."""
from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the sum of Euclidean distances to the rows of `points` (N, d)."""
    guess = points.mean(dim=0)
    for _ in range(max_iter):
        dist = (points - guess).norm(dim=1).clamp_min(1e-8)  # (N,)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - guess).norm() < tol * max(1.0, guess.norm().item()):
            return new
        guess = new
    return guess
