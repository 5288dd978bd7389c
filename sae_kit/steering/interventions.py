"""What to do to a latent (add its decoder direction, clamp it, ablate it) or to a raw direction, and where.

Positions are absolute token positions counted from the start of the prompt, across the prompt and every
generated token, so the same spec selects the same tokens with and without the KV cache. In a left-padded batch
(generate's attention_mask), each row counts from its first real token.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

MODES = ("add", "clamp", "ablate")
POSITIONS_HELP = "'all', 'last' (the prompt's last token and every generated token), or 'i:j' (e.g. '0:5', '3:')"


@dataclass(frozen=True)
class Intervention:
    """One edit of one SAE latent during forward passes and generation."""

    feature: int
    """Latent index in [0, d_sae)."""
    mode: str = "add"
    """"add": h += strength·scale_f·d̂_f; "clamp": set the latent to strength, keeping the SAE error term;
    "ablate": clamp to 0 (strength ignored)."""
    strength: float = 1.0
    """For add: multiples of the latent's typical max activation scale_f; for clamp: the activation value itself."""
    positions: str = "all"
    """Which tokens to edit: see POSITIONS_HELP."""

    def __post_init__(self) -> None:
        if isinstance(self.feature, bool) or not isinstance(self.feature, int):
            raise ValueError(f"latent index must be an int, got {self.feature!r}")
        if self.feature < 0:
            raise ValueError(f"latent index must be >= 0, got {self.feature}")
        if self.mode not in MODES:
            raise ValueError(f"unknown steering mode {self.mode!r}; valid: {list(MODES)}")
        check_strength(self.strength)
        parse_positions(self.positions)

    @property
    def value(self) -> float:
        """The clamp target (0 for ablate)."""
        return 0.0 if self.mode == "ablate" else float(self.strength)


@dataclass(frozen=True)
class DirectionIntervention:
    """Add a raw direction (e.g. a difference-in-means vector) at a hook point: h += strength·direction."""

    hook_point: str
    """Where to add it (must exist in the model with the direction's width)."""
    direction: Tensor = field(repr=False)
    """(width,) vector, used as given: its norm is the unit of `strength`."""
    strength: float = 1.0
    """Multiple of `direction` to add (1 = the full vector, e.g. the gap between two class means)."""
    positions: str = "all"
    """Which tokens to edit: see POSITIONS_HELP."""

    def __post_init__(self) -> None:
        if not isinstance(self.direction, Tensor) or self.direction.ndim != 1:
            shape = tuple(self.direction.shape) if isinstance(self.direction, Tensor) else type(self.direction)
            raise ValueError(f"direction must be a 1-d tensor (width,), got {shape}")
        if not bool(torch.isfinite(self.direction).all()):
            raise ValueError(f"direction at {self.hook_point!r} has NaN or inf entries")
        check_strength(self.strength)
        parse_positions(self.positions)


def check_strength(strength: float) -> None:
    """Raise ValueError unless strength is a finite real number."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"steering strength must be a finite number, got {strength!r}")


def check_temperature(temperature: float, name: str = "temperature") -> None:
    """Raise ValueError (naming the setting `name`) unless temperature is a finite number >= 0 (0 = greedy)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 = greedy), got {temperature}")


def parse_positions(spec: str) -> str | tuple[int | None, int | None]:
    """"all" / "last", or (start, stop) for "i:j" (either side may be empty)."""
    if spec in ("all", "last"):
        return spec
    m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", spec) if isinstance(spec, str) else None
    if not m:
        raise ValueError(f"bad positions {spec!r}: must be {POSITIONS_HELP}")
    start, stop = (int(g) if g else None for g in m.groups())
    if start is not None and stop is not None and stop <= start:
        raise ValueError(f"positions {spec!r} select nothing: stop must exceed start")
    return start, stop


def position_mask(spec: str, pos: Tensor, prompt_len: int | Tensor) -> Tensor:
    """Bool mask, shaped like `pos`, of the absolute positions that `spec` edits, given the prompt's length
    (an int, or a tensor broadcasting against `pos`, e.g. (B, 1) per row)."""
    parsed = parse_positions(spec)
    if parsed == "all":
        return torch.ones_like(pos, dtype=torch.bool)
    if parsed == "last":
        # The prompt's last token and everything generated after it: this is what "the last position of every
        # forward" means under the KV cache, and defining it absolutely makes uncached generation agree.
        return pos >= prompt_len - 1
    start, stop = parsed
    mask = pos >= (start or 0)
    return mask & (pos < stop) if stop is not None else mask
