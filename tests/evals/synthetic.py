"""Synthetic concept data for the suite tests: planted directions, SAEs that read them, tasks built from them."""
from __future__ import annotations

import torch

from evals.tasks import ExampleSet, ProbeTask, TaskSet
from sae_kit.sae.base import SAEConfig, SparseCoder

HOOK = "blocks.0.hook_resid_post"


def planted_sae(directions: torch.Tensor, k: int, hook: str = HOOK) -> SparseCoder:
    """A TopK SAE whose latent i reads and writes the unit direction directions[i] (no biases)."""
    d_sae, d_in = directions.shape
    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k, hook_point=hook))
    with torch.no_grad():
        unit = directions / directions.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(unit)
        sae.W_enc.copy_(unit.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def orthonormal(n: int, d: int, seed: int = 100) -> torch.Tensor:
    """(n, d) orthonormal rows (n ≤ d); the default seed differs from the control's, whose draws would match."""
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()


def token_set(x: torch.Tensor, y: torch.Tensor) -> ExampleSet:
    return ExampleSet(x[:, None, :], torch.ones(len(x), 1, dtype=torch.bool), y)


def planted_tasks(n_tasks: int = 4, d: int = 32, n: int = 400, strength: float = 3.0, seed: int = 0,
                  hook: str = HOOK) -> tuple[TaskSet, torch.Tensor]:
    """Binary tasks where the positives carry `strength` × their task's direction on top of isotropic noise.

    Returns the tasks and (2 n_tasks, d) orthonormal directions: the task directions first, then as many others.
    """
    dirs = orthonormal(n_tasks * 2, d, seed + 100)
    gen = torch.Generator().manual_seed(seed + 1)
    tasks = []
    for t in range(n_tasks):
        sets = []
        for size in (n, n // 2):
            y = torch.arange(size) % 2
            noise = torch.randn(size, d, generator=gen) * 0.5
            sets.append(token_set(noise + strength * y[:, None].float() * dirs[t], y))
        tasks.append(ProbeTask(f"t{t}", f"planted direction {t}", sets[0], sets[1], {"level": "token"}))
    return TaskSet(hook, "synthetic", "planted", tasks), dirs
