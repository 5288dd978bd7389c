"""Typed training configuration; saved beside every checkpoint and compared on resume."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "abstopk", "relu")


@dataclass(frozen=True)
class TrainConfig:
    """One SAE or transcoder training run."""

    activations: str | None = None
    """Folder written by `sae-kit cache`; None trains in streaming mode from `model` + `dataset`."""
    model: str = "reference"
    """Model for streaming mode (hub name, local folder or "reference")."""
    hook_point: str | None = None
    """Input hook point; None picks the store's only one (or blocks.2.hook_resid_post when streaming)."""
    dataset: str = "stdlib"
    """Text source for streaming mode."""
    context_size: int = 128
    """Tokens per context in streaming mode."""
    architecture: str = "topk"
    """Sparse coder architecture."""
    k: int = 32
    """Active latents per token (TopK family)."""
    expansion: int = 16
    """d_sae = expansion · d_in when d_sae is not given."""
    d_sae: int | None = None
    """Number of latents; overrides expansion."""
    transcoder: bool = False
    """Map hook_point to target_hook_point instead of reconstructing hook_point."""
    target_hook_point: str | None = None
    """Target hook point of a transcoder."""
    skip_connection: bool = False
    """Add the zero-initialised linear skip path (skip transcoder)."""
    n_tokens: int = 2_000_000
    """Training tokens (rows); epochs over a smaller store repeat it with a new shuffle."""
    batch_size: int = 4096
    """Rows per optimiser step."""
    lr: float | None = None
    """Peak learning rate; None scales 2e-4 by 1/sqrt(d_sae / 16384) as sparsify does."""
    warmup_steps: int = 100
    """Linear LR warm-up steps."""
    decay_start: float = 0.8
    """Fraction of training after which the LR decays linearly to zero."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    sparsity_coefficient: float = 0.0
    """Final λ for JumpReLU / ReLU, warmed up over the first 5% of steps."""
    dead_tokens_threshold: int = 1_000_000
    """A latent that has not fired for this many tokens counts as dead for AuxK."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many tokens (0: only at the end)."""
    seed: int = 0
    """Seed for initialisation and data order."""
    out: str = "runs/sae"
    """Output folder; the SAE goes into out/<name>."""
    name: str | None = None
    """Subfolder name; None uses the architecture."""
    device: str | None = None
    """Device; None picks CUDA when present."""
    log_every: int = 10
    """Steps between metrics.jsonl lines."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; valid: {list(ARCHITECTURES)}")
        for field in ("n_tokens", "batch_size", "expansion", "context_size", "log_every"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.d_sae is not None and self.d_sae <= 0:
            raise ValueError(f"d_sae must be positive, got {self.d_sae}")
        if self.architecture in ("topk", "batchtopk", "abstopk") and self.k <= 0:
            raise ValueError(f"k must be positive, got {self.k}")
        if self.transcoder and not self.target_hook_point:
            raise ValueError("a transcoder needs target_hook_point (the MLP output hook point)")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

    @property
    def run_name(self) -> str:
        """Subfolder of `out` holding this SAE."""
        return self.name or self.architecture

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict (config file), rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)
