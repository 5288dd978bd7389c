"""Parse latent selections: a range `0:64`, a list `3,17,42`, or `random:200` (a seeded sample of live latents)."""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

SPEC_FORMS = "'START:STOP' (e.g. 0:64), a list 'I,J,K' (e.g. 3,17,42) or 'random:N' (e.g. random:200)"


@dataclass(frozen=True)
class LatentSpec:
    """A parsed selection: explicit indices, or a request for `n_random` live latents."""

    indices: tuple[int, ...] = ()
    """Explicit latent indices (empty for a random selection)."""
    n_random: int = 0
    """How many live latents to sample (0 for an explicit selection)."""

    @property
    def is_random(self) -> bool:
        """True for `random:N`."""
        return self.n_random > 0


def parse_latent_spec(spec: str, d_sae: int) -> LatentSpec:
    """Parse and range-check a selection against an SAE with d_sae latents."""
    text = spec.strip()
    if not text:
        raise ValueError(f"empty latent spec; use {SPEC_FORMS}")
    try:
        if text.startswith("random:"):
            n = int(text.split(":", 1)[1])
            if not 0 < n <= d_sae:
                raise ValueError(f"latent spec {spec!r}: random sample size must be in 1..{d_sae} (d_sae), got {n}")
            return LatentSpec(n_random=n)
        if ":" in text:
            start_s, stop_s = text.split(":", 1)
            start = int(start_s) if start_s else 0
            stop = int(stop_s) if stop_s else d_sae
            if not 0 <= start < stop <= d_sae:
                raise ValueError(
                    f"latent range {spec!r} out of bounds: need 0 <= START < STOP <= {d_sae} (d_sae)"
                )
            return LatentSpec(indices=tuple(range(start, stop)))
        indices = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError as err:
        if "latent" in str(err):
            raise
        raise ValueError(f"cannot parse latent spec {spec!r}; use {SPEC_FORMS}") from None
    bad = [i for i in indices if not 0 <= i < d_sae]
    if bad:
        raise ValueError(f"latent indices {bad} out of range for an SAE with d_sae={d_sae} (valid 0..{d_sae - 1})")
    if not indices:
        raise ValueError(f"latent spec {spec!r} selects no latents; use {SPEC_FORMS}")
    return LatentSpec(indices=tuple(dict.fromkeys(indices)))


def sample_live(live: Sequence[int], n: int, seed: int) -> list[int]:
    """A seeded sample of n live latents (all of them, sorted, when fewer are live)."""
    live = sorted(live)
    if len(live) <= n:
        return live
    return sorted(random.Random(seed).sample(live, n))
