"""What to do to a latent: add its decoder direction, clamp it, or ablate it, and at which positions."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

MODES = ("add", "clamp", "ablate")


@dataclass(frozen=True)
class Intervention:
    """One edit of one latent during a forward pass or generation."""

    feature: int
    """Latent index in [0, d_sae)."""
    mode: str = "add"
    """"add": h += strength·scale·d̂_f; "clamp": set the latent to strength (error term kept); "ablate": clamp to 0."""
    strength: float = 1.0
    """For add: multiples of the latent's typical max activation; for clamp: the activation value itself."""
    positions: str = "all"
    """"all", "last" (the last position of every forward call: the prompt's end, then each new token), or "i:j"
    (absolute token positions, counted across the prompt and generated tokens)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown steering mode {self.mode!r}; valid: {list(MODES)}")
        if not math.isfinite(self.strength):
            raise ValueError(f"steering strength must be a finite number, got {self.strength}")
        if self.feature < 0:
            raise ValueError(f"latent index must be >= 0, got {self.feature}")
        parse_positions(self.positions)

    @property
    def value(self) -> float:
        """The clamp target (0 for ablate)."""
        return 0.0 if self.mode == "ablate" else self.strength


def parse_positions(spec: str) -> tuple[int | None, int | None] | str:
    """"all" / "last", or (start, stop) for "i:j" (either side may be empty)."""
    if spec in ("all", "last"):
        return spec
    m = re.fullmatch(r"(\d*):(\d*)", spec)
    if not m:
        raise ValueError(f"positions must be 'all', 'last' or 'i:j' (e.g. '0:5', '3:'), got {spec!r}")
    start, stop = (int(g) if g else None for g in m.groups())
    if start is not None and stop is not None and stop <= start:
        raise ValueError(f"positions {spec!r} select nothing: stop must exceed start")
    return start, stop
