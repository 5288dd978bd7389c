"""Schedules as pure functions of the step, so a resumed run recomputes them exactly."""
from __future__ import annotations

import math


def lr_at(
    step: int, total_steps: int, peak: float, warmup_steps: int, decay_start: float, decay: str = "linear",
    final_fraction: float = 0.0,
) -> float:
    """LR of `step` (0-based): linear warm-up, constant, then linear or cosine decay over the last
    (1 − decay_start) of training, reaching final_fraction · peak at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    start = max(warmup_steps, int(decay_start * total_steps))
    if decay == "none" or step < start or total_steps - 1 <= start:
        return peak
    progress = min(1.0, (step - start) / (total_steps - 1 - start))  # 0 at the decay start, 1 at the last step
    low = final_fraction * peak
    if decay == "linear":
        return peak + (low - peak) * progress
    if decay == "cosine":
        return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown LR decay {decay!r}; valid: linear, cosine, none")


def sparsity_at(step: int, total_steps: int, final: float, warmup_fraction: float = 0.05) -> float:
    """λ of `step`, warmed up linearly from ~0 to `final` over the first warmup_fraction of training."""
    warm = max(1, int(warmup_fraction * total_steps))
    return final * min(1.0, (step + 1) / warm)


def default_lr(d_sae: int) -> float:
    """sparsify's scaling rule: 2e-4 at 16384 latents, ∝ 1/sqrt(d_sae)."""
    return 2e-4 / math.sqrt(d_sae / 16384)


def warmup_steps_for(total_steps: int, warmup_steps: int) -> int:
    """The warm-up actually used: at most a tenth of training, at least one step."""
    return max(1, min(warmup_steps, total_steps // 10))
