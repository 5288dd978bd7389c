"""Schedules as pure functions of the step, so a resumed run recomputes them exactly."""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int, decay_start: float) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last (1 − decay_start) of training."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    start = int(decay_start * total_steps)
    if step < start or total_steps <= start:
        return peak
    return peak * max(0.0, (total_steps - step) / (total_steps - start))


def sparsity_at(step: int, total_steps: int, final: float, warmup_fraction: float = 0.05) -> float:
    """λ warmed up linearly over the first warmup_fraction of training."""
    warm = max(1, int(warmup_fraction * total_steps))
    return final * min(1.0, (step + 1) / warm)


def default_lr(d_sae: int) -> float:
    """sparsify's scaling rule: 2e-4 at 16384 latents, ∝ 1/sqrt(d_sae)."""
    return 2e-4 / math.sqrt(d_sae / 16384)
