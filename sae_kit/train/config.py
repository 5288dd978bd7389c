"""Typed training configuration: one pass over the activations trains every SAE it describes.

`TrainConfig` holds the data, optimisation and output settings shared by the pass; its hook points and its
`sweep` section expand into one `SAESpec` per SAE (`TrainConfig.specs()`), each saved in its own subfolder of
`out`. The config is saved in every checkpoint and compared on resume.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from sae_kit.sae import SparseCoder
from sae_kit.sae.base import ArchitectureKnobs

ARCHITECTURES = tuple(SparseCoder.REGISTRY)
"""Every registered architecture (one file each in sae_kit/sae/, imported by sae_kit/sae/__init__.py)."""
TOPK_FAMILY = tuple(name for name, cls in SparseCoder.REGISTRY.items() if cls.has_k)
"""Architectures with a k (and AuxK): those whose class sets `has_k`."""
LR_DECAYS = ("linear", "cosine", "none")
DTYPES = ("auto", "float32", "bfloat16")
SWEEPABLE = ("k", "expansion", "d_sae", "lr", "sparsity_coefficient", "seed")


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


@dataclass(frozen=True)
class SweepConfig:
    """Values to sweep in one pass; each non-empty field multiplies the number of SAEs (cartesian product)."""

    k: tuple[int, ...] = ()
    """Active latents per token; empty uses TrainConfig.k."""
    expansion: tuple[int, ...] = ()
    """Expansion factors; empty uses TrainConfig.expansion (ignored where d_sae is swept or set)."""
    d_sae: tuple[int, ...] = ()
    """Latent counts; empty uses TrainConfig.d_sae / expansion."""
    lr: tuple[float, ...] = ()
    """Peak learning rates; empty uses TrainConfig.lr."""
    sparsity_coefficient: tuple[float, ...] = ()
    """Final λ values (jumprelu / relu); empty uses TrainConfig.sparsity_coefficient."""
    seed: tuple[int, ...] = ()
    """Initialisation seeds (e.g. 0, 1 for a consistency pair; the data order stays TrainConfig.seed's); empty uses
    TrainConfig.seed."""

    def __post_init__(self) -> None:
        casts = {"k": int, "expansion": int, "d_sae": int, "lr": float, "sparsity_coefficient": float, "seed": int}
        for name, cast in casts.items():
            raw = _as_tuple(getattr(self, name))
            try:
                values = tuple(cast(v) for v in raw)
            except (TypeError, ValueError):
                raise ValueError(f"sweep.{name} must be a list of {cast.__name__}s, got {getattr(self, name)!r}") from None
            if len(set(values)) != len(values):
                raise ValueError(f"sweep.{name} has duplicate values: {list(values)}")
            if name not in ("sparsity_coefficient", "seed") and any(v <= 0 for v in values):
                raise ValueError(f"sweep.{name} values must be positive, got {list(values)}")
            if name in ("sparsity_coefficient", "seed") and any(v < 0 for v in values):
                raise ValueError(f"sweep.{name} values must be >= 0, got {list(values)}")
            object.__setattr__(self, name, values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepConfig:
        """Build from the `sweep:` section of a config file, rejecting unknown keys by name."""
        unknown = sorted(set(data) - set(SWEEPABLE))
        if unknown:
            raise ValueError(f"unknown sweep keys {unknown}; sweepable fields: {list(SWEEPABLE)}")
        return cls(**data)


@dataclass(frozen=True)
class SAESpec:
    """One SAE of the pass: where it reads, its size and its own hyper-parameters."""

    name: str
    """Subfolder of `out`."""
    hook_point: str | None
    """Input hook point (None: the source's only one, resolved when the source opens)."""
    target_hook_point: str | None
    """Target hook point (transcoders), else None."""
    k: int
    """Active latents per token (TopK family)."""
    d_sae: int | None
    """Latents; None means expansion × d_in."""
    expansion: int
    """Used when d_sae is None."""
    lr: float | None
    """Peak LR; None scales with d_sae."""
    sparsity_coefficient: float
    """Final λ."""
    seed: int = 0
    """Initialisation seed."""


@dataclass(frozen=True)
class TrainConfig(ArchitectureKnobs):
    """One training pass: where the activations come from, the SAEs to train on them, and how."""

    # -- data ---------------------------------------------------------------------------------------------
    activations: str | None = None
    """Folder written by `sae-kit cache`; None trains in streaming mode from `model` + `dataset` (no disk)."""
    model: str = "reference"
    """Model for streaming mode (hub name, local folder or "reference")."""
    hook_points: tuple[str, ...] = ()
    """Input hook points, one SAE (per sweep point) each; empty picks the store's only one, or
    blocks.2.hook_resid_post when streaming. A single string is accepted and comma-split."""
    target_hook_points: tuple[str, ...] = ()
    """Transcoders: the target hook point paired with each input hook point (same length)."""
    dataset: str = "stdlib"
    """Text source for streaming mode: "stdlib", a hub dataset or local files (see DatasetConfig.path)."""
    dataset_name: str | None = None
    """Hub dataset configuration name in streaming mode (e.g. "wikitext-103-raw-v1")."""
    text_column: str = "text"
    """Column holding the text in streaming mode."""
    context_size: int = 128
    """Tokens per context in streaming mode."""
    # -- the SAEs -----------------------------------------------------------------------------------------
    architecture: str = "topk"
    """Sparse coder architecture: a name in SparseCoder.REGISTRY (topk, batchtopk, jumprelu, abstopk, relu,
    matryoshka_batchtopk, gated, matching_pursuit, kron, adaptivek)."""
    k: int = 32
    """Active latents per token (TopK family)."""
    expansion: int = 16
    """d_sae = expansion · d_in when d_sae is not given."""
    d_sae: int | None = None
    """Number of latents; overrides expansion."""
    transcoder: bool = False
    """Map each hook point to its target hook point instead of reconstructing it."""
    skip_connection: bool = False
    """Add the zero-initialised linear skip path (skip transcoder)."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """Values swept in the same pass (cartesian product), sharing every batch read."""
    # -- optimisation ---------------------------------------------------------------------------------------
    n_tokens: int = 2_000_000
    """Training tokens (rows); a smaller store is repeated in further epochs with a new shuffle."""
    batch_size: int = 4096
    """Rows per optimiser step (the global batch, split across data-parallel ranks)."""
    micro_batches: int = 1
    """Split each (per-rank) batch into this many slices and average their gradients: saves memory, and is the
    single-process equivalent of that many data-parallel ranks."""
    lr: float | None = None
    """Peak learning rate; None scales 2e-4 by 1/sqrt(d_sae / 16384) as sparsify does."""
    warmup_steps: int = 100
    """Linear LR warm-up steps (capped at a tenth of training)."""
    lr_decay: str = "linear"
    """LR decay after `decay_start`: linear, cosine or none."""
    decay_start: float = 0.8
    """Fraction of training after which the LR decays to `lr_final_fraction` of its peak."""
    lr_final_fraction: float = 0.0
    """LR at the last step as a fraction of the peak."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    sparsity_coefficient: float = 0.0
    """Final λ for JumpReLU / ReLU / Gated (Gated needs λ > 0)."""
    sparsity_warmup: float = 0.05
    """Fraction of training over which λ warms up linearly from 0."""
    dead_tokens_threshold: int = 10_000_000
    """A latent that has not fired for this many tokens counts as dead for AuxK and the dead fraction."""
    seed: int = 0
    """Seed for the data order, and for initialisation unless `sweep.seed` lists initialisation seeds."""
    # -- output, logging, hardware -----------------------------------------------------------------------
    out: str = "runs/sae"
    """Output folder; each SAE goes into out/<name>."""
    name: str | None = None
    """Base of the subfolder names; None uses the architecture."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many tokens (0: never)."""
    log_every: int = 10
    """Steps between metrics.jsonl lines."""
    device: str | None = None
    """Torch device; None picks CUDA when present."""
    dtype: str = "auto"
    """Encoder precision: "bfloat16" runs the encoder product on bf16 operands (tensor cores on CUDA) and selects
    latents from its pre-activations; "float32" runs it in fp32; "auto" is bfloat16 on CUDA, float32 elsewhere.
    Parameters, gradients and Adam state stay float32 in every case."""
    distribute_modules: bool = False
    """With several ranks, give each rank whole SAEs (on the full batch) instead of slicing every batch."""
    wandb: bool = False
    """Also log metrics to Weights & Biases (when installed)."""
    wandb_project: str = "sae-kit"
    """W&B project name."""

    def __post_init__(self) -> None:
        for name in ("hook_points", "target_hook_points"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        if isinstance(self.sweep, dict):
            object.__setattr__(self, "sweep", SweepConfig.from_dict(self.sweep))
        if not isinstance(self.sweep, SweepConfig):
            raise ValueError(f"sweep must be a SweepConfig or a mapping, got {type(self.sweep).__name__}")
        if self.architecture not in SparseCoder.REGISTRY:
            raise ValueError(f"unknown architecture {self.architecture!r}; valid: {list(SparseCoder.REGISTRY)}")
        self._check_architecture_options()
        for name in ("n_tokens", "batch_size", "expansion", "context_size", "log_every", "micro_batches",
                     "dead_tokens_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by micro_batches {self.micro_batches}")
        if self.d_sae is not None and self.d_sae <= 0:
            raise ValueError(f"d_sae must be positive, got {self.d_sae}")
        has_k = SparseCoder.REGISTRY[self.architecture].has_k
        if has_k and self.k <= 0:
            raise ValueError(f"k must be positive, got {self.k}")
        if self.d_sae is not None and has_k and not self.sweep.k and self.k >= self.d_sae:
            raise ValueError(f"k must be smaller than d_sae, got k={self.k}, d_sae={self.d_sae}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.sparsity_coefficient < 0:
            raise ValueError(f"sparsity_coefficient must be >= 0, got {self.sparsity_coefficient}")
        if self.transcoder:
            if not self.target_hook_points:
                raise ValueError("a transcoder needs target_hook_points (e.g. blocks.2.hook_mlp_out)")
            if len(self.target_hook_points) != max(1, len(self.hook_points)):
                raise ValueError(f"transcoders pair each hook point with one target: got hook_points "
                                 f"{list(self.hook_points)} and target_hook_points {list(self.target_hook_points)}")
        elif self.target_hook_points:
            raise ValueError("target_hook_points is set but transcoder is False; pass --transcoder")
        if self.skip_connection and not self.transcoder:
            raise ValueError("skip_connection is for transcoders; pass --transcoder --target-hook H as well")
        if len(set(self.hook_points)) != len(self.hook_points):
            raise ValueError(f"hook_points has duplicates: {list(self.hook_points)}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {list(LR_DECAYS)}, got {self.lr_decay!r}")
        if not 0.0 <= self.decay_start <= 1.0:
            raise ValueError(f"decay_start must lie in [0, 1], got {self.decay_start}")
        if not 0.0 <= self.lr_final_fraction <= 1.0:
            raise ValueError(f"lr_final_fraction must lie in [0, 1], got {self.lr_final_fraction}")
        if not 0.0 <= self.sparsity_warmup <= 1.0:
            raise ValueError(f"sparsity_warmup must lie in [0, 1], got {self.sparsity_warmup}")
        for name in ("warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")

    def _check_architecture_options(self) -> None:
        """Normalise and check the per-architecture knobs that need no activation width (the rest are checked by
        SAEConfig when each SAE is built, before the first step)."""
        if self.matryoshka_widths is not None:
            try:
                widths = tuple(int(w) for w in _as_tuple(self.matryoshka_widths))
            except (TypeError, ValueError):
                raise ValueError(f"matryoshka_widths must be a list of integers, got {self.matryoshka_widths!r}") from None
            object.__setattr__(self, "matryoshka_widths", widths)
            if not widths or widths[0] <= 0 or any(b <= a for a, b in zip(widths, widths[1:])):
                raise ValueError(f"matryoshka_widths are the nested dictionary sizes, strictly increasing and "
                                 f"positive (the last = d_sae), got {list(widths)}")
            if self.d_sae is not None and not (self.sweep.d_sae or self.sweep.expansion) and widths[-1] != self.d_sae:
                raise ValueError(f"matryoshka_widths must end at d_sae={self.d_sae} (the whole dictionary), got "
                                 f"{list(widths)}")
        cls = SparseCoder.REGISTRY[self.architecture]
        # A sweep over a value the architecture never reads trains identical SAEs under different names.
        if self.sweep.k and not cls.has_k:
            raise ValueError(f"{self.architecture} has no k, so a sweep over k {list(self.sweep.k)} would train "
                             f"identical SAEs; sweep k with {', '.join(TOPK_FAMILY)}")
        if self.sweep.sparsity_coefficient and not cls.uses_sparsity_coefficient:
            raise ValueError(f"{self.architecture} has no sparsity penalty, so a sweep over sparsity_coefficient "
                             f"{list(self.sweep.sparsity_coefficient)} would train identical SAEs; it applies to "
                             f"{', '.join(n for n, c in SparseCoder.REGISTRY.items() if c.uses_sparsity_coefficient)}")
        lams = self.sweep.sparsity_coefficient or (self.sparsity_coefficient,)
        if self.architecture == "gated" and any(lam <= 0 for lam in lams):
            raise ValueError(f"gated needs a sparsity coefficient λ > 0 (the L1 on the gate's activations), got "
                             f"{list(lams)}; e.g. --sparsity-coefficient 0.01")
        if self.target_l0 is not None:
            if self.architecture != "jumprelu":
                raise ValueError(f"target_l0 is JumpReLU's L0 target; {self.architecture} does not read it")
            if any(lam <= 0 for lam in lams):
                raise ValueError(f"target_l0 {self.target_l0} is reached through the penalty λ·(L0/target_l0 − 1)², "
                                 f"which λ = {min(lams)} switches off; pass a sparsity coefficient, e.g. "
                                 f"--sparsity-coefficient 1")
        if not 0.0 <= self.mp_residual_threshold < 1.0:
            raise ValueError(f"mp_residual_threshold must lie in [0, 1), got {self.mp_residual_threshold}")
        for name in ("kron_m", "kron_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        lo, hi = self.adaptivek_min_k, self.adaptivek_max_k
        if (lo is not None and lo <= 0) or (hi is not None and hi <= 0) or (lo is not None and hi is not None and lo > hi):
            raise ValueError(f"adaptivek needs 1 ≤ adaptivek_min_k ≤ adaptivek_max_k, got {lo} and {hi}")
        if self.adaptivek_probe_coefficient < 0 or self.adaptivek_l1_coefficient < 0:
            raise ValueError("adaptivek_probe_coefficient and adaptivek_l1_coefficient must be >= 0")

    def specs(self, default_hook: str | None = None) -> list[SAESpec]:
        """Every SAE of the pass, in a fixed order; names are unique subfolders of `out`."""
        hooks = self.hook_points or (default_hook,)
        targets = self.target_hook_points or (None,) * len(hooks)
        sw = self.sweep
        grid = {
            "hook": list(zip(hooks, targets)),
            "k": list(sw.k or (self.k,)),
            "size": [("d", d) for d in sw.d_sae] or (
                [("d", self.d_sae)] if self.d_sae is not None else [("x", e) for e in (sw.expansion or (self.expansion,))]),
            "lr": list(sw.lr or (self.lr,)),
            "lam": list(sw.sparsity_coefficient or (self.sparsity_coefficient,)),
            "seed": list(sw.seed or (self.seed,)),
        }
        base = self.name or self.architecture
        specs = []
        for (hook, target), k, (kind, size), lr, lam, seed in itertools.product(*grid.values()):
            parts = [base]
            if len(grid["hook"]) > 1:
                parts.append(str(hook))
            if len(grid["k"]) > 1:
                parts.append(f"k{k}")
            if len(grid["size"]) > 1:
                parts.append(f"{kind}{size}")
            if len(grid["lr"]) > 1:
                parts.append(f"lr{lr:g}")
            if len(grid["lam"]) > 1:
                parts.append(f"lambda{lam:g}")
            if len(grid["seed"]) > 1:
                parts.append(f"seed{seed}")
            specs.append(SAESpec(
                name="_".join(parts), hook_point=hook, target_hook_point=target, k=k,
                d_sae=size if kind == "d" else None, expansion=size if kind == "x" else self.expansion,
                lr=lr, sparsity_coefficient=lam, seed=seed,
            ))
        return specs

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON / checkpoints (tuples as lists)."""
        d = self._fields_then_knobs()
        d["hook_points"], d["target_hook_points"] = list(self.hook_points), list(self.target_hook_points)
        d["sweep"] = {k: list(v) for k, v in d["sweep"].items()}
        if self.matryoshka_widths is not None:
            d["matryoshka_widths"] = list(self.matryoshka_widths)
        return d

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (configs are never mutated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict (config file), rejecting unknown keys by name; list values of sweepable fields
        (k, expansion, d_sae, lr, sparsity_coefficient) go into the sweep."""
        data = dict(data)
        # Friendly singular aliases for the hook-point lists.
        for alias, name in (("hook_point", "hook_points"), ("target_hook_point", "target_hook_points")):
            if alias in data:
                if name in data:
                    raise ValueError(f"give either {alias} or {name}, not both")
                data[name] = data.pop(alias)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; valid keys: {sorted(known)}")
        sweep = dict(data.pop("sweep", None) or {})
        if isinstance(sweep, SweepConfig):
            sweep = {k: v for k, v in dataclasses.asdict(sweep).items() if v}
        for name in SWEEPABLE:
            value = data.get(name)
            if isinstance(value, (list, tuple)) or (isinstance(value, str) and "," in value):
                values = _as_tuple(value)
                if len(values) == 1:
                    data[name] = values[0]
                else:
                    sweep[name] = data.pop(name)
        for name in ("k", "expansion", "d_sae"):
            if isinstance(data.get(name), str):
                try:
                    data[name] = int(data[name])
                except ValueError:
                    raise ValueError(f"{name} must be an integer, got {data[name]!r}") from None
        for name in ("lr", "sparsity_coefficient"):
            if isinstance(data.get(name), str):
                try:
                    data[name] = float(data[name])
                except ValueError:
                    raise ValueError(f"{name} must be a number, got {data[name]!r}") from None
        return cls(**data, sweep=SweepConfig.from_dict(sweep))
