"""Synthetic concept data for the suite tests: planted directions, SAEs that read them, tasks built from them."""
from __future__ import annotations

import copy

import numpy as np
import torch

from evals.absorption import LetterData
from evals.scr import PairTasks, quadrant_sets
from evals.tasks import ExampleSet, ProbeTask, TaskSet
from sae_kit.sae.base import SAEConfig, SparseCoder

HOOK = "blocks.0.hook_resid_post"


def planted_sae(directions: torch.Tensor, k: int, hook: str = HOOK, architecture: str = "topk") -> SparseCoder:
    """An SAE (TopK by default) whose latent i reads and writes the unit direction directions[i] (no biases)."""
    d_sae, d_in = directions.shape
    sae = SparseCoder.from_config(SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, k=k, hook_point=hook))
    with torch.no_grad():
        unit = directions / directions.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(unit)
        sae.W_enc.copy_(unit.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def rescaled(sae: SparseCoder, scale: torch.Tensor) -> SparseCoder:
    """The same function with latent i scaled by scale[i] > 0: W_enc[:, i], b_enc[i] (and JumpReLU's θ_i)
    × scale[i], W_dec[i] ÷ scale[i]. Decoding is unchanged; ReLU and JumpReLU decisions too (TopK's ranking only
    when the scale is the same for every latent)."""
    out = copy.deepcopy(sae)
    with torch.no_grad():
        out.W_enc.mul_(scale[None, :])
        out.b_enc.mul_(scale)
        out.W_dec.div_(scale[:, None])
        if hasattr(out, "log_threshold"):  # JumpReLU's θ
            out.log_threshold.add_(scale.log())
    return out


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


def letters_world(n_tokens: int = 60, per_token: int = 4, d: int = 96, seed: int = 0):
    """Identifier tokens of 3 letters: x = 2·(letter direction) + 1·(token direction) + noise."""
    dirs = orthonormal(3 + n_tokens, d, seed)
    letter_dirs, token_dirs = dirs[:3], dirs[3:]
    token_letter = torch.arange(n_tokens) % 3
    gen = torch.Generator().manual_seed(seed + 1)
    toks = torch.arange(n_tokens).repeat_interleave(per_token)
    x = 2 * letter_dirs[token_letter[toks]] + token_dirs[toks] + 0.05 * torch.randn(len(toks), d, generator=gen)
    test_tokens = set(range(0, n_tokens, 5))  # every fifth token is unseen in training
    data = LetterData(np.arange(len(toks)), token_letter[toks].numpy(), np.array([t in test_tokens for t in
                                                                                    toks.tolist()]), toks.numpy())
    return x, data, letter_dirs, token_dirs, token_letter


def pair_world(d: int = 32, n: int = 1600, seed: int = 0) -> tuple[PairTasks, torch.Tensor]:
    """Concepts A (±u) and B (±v), SAEBench's three sets from four quadrants; the SAE directions returned are
    u, −u, v, −v and two others (a ReLU latent per side of each concept)."""
    dirs = orthonormal(4, d, seed)
    u, v = dirs[0], dirs[1]
    gen = torch.Generator().manual_seed(seed + 1)
    rng = np.random.default_rng(seed)
    sets = {}
    for split, size in (("train", n), ("test", n // 2)):
        a = torch.arange(size) % 2
        b = (torch.arange(size) // 2) % 2
        # B is the louder concept: a probe trained where A and B coincide leans on B
        sa, sb = (2 * a - 1)[:, None].float(), (2 * b - 1)[:, None].float()
        x = 1.0 * sa * u + 2.0 * sb * v + 0.5 * torch.randn(size, d, generator=gen)
        quads = {f"{i}{j}": np.nonzero(((a == i) & (b == j)).numpy())[0] for i in (1, 0) for j in (1, 0)}
        for key, (pos, neg) in quadrant_sets(quads, size, rng).items():
            idx = torch.as_tensor(np.concatenate([pos, neg]))
            y = torch.cat([torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg), dtype=torch.long)])
            sets.setdefault(key, {})[split] = token_set(x[idx], y)
    tasks = {k: ProbeTask(k, k, v["train"], v["test"]) for k, v in sets.items()}
    return PairTasks("A+B", tasks["a"], tasks["b"], tasks["biased"], {"pair": "A+B"}), torch.stack(
        [u, -u, v, -v, dirs[2], dirs[3]])
