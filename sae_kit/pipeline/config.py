"""The `sae-kit run` config: one YAML file, one section per stage, each section the fields of that stage's own
library config (CacheConfig, TrainConfig, EvalConfig, InterpConfig), so a field added to a stage appears here too.

    out: runs/default            # every stage writes OUT/<stage>/...; the site is OUT/index.html
    model: reference             # hub name, local folder or "reference"
    cache:  {n_tokens: 1000000, dataset: {path: stdlib, context_size: 128}}
    train:  [{name: topk, architecture: topk, hook_points: blocks.2.hook_resid_post, k: [16, 32, 64]}]
    eval:   {n_tokens: 65536}
    interp: {latents: 64, records: {n_tokens: 100000}}
    steer:  {n_latents: 2, prompts: ["def __init__(self"], strengths: [0, 2, 4, 8]}

Fields the pipeline sets itself (each stage's `out`, the model, the device, the activations the trainer reads)
are top-level keys or follow from the other stages; `validate.load_config` says so when a section sets them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from activation_store.store import CacheConfig
from sae_kit.train.config import TrainConfig

STAGES = ("cache", "train", "eval", "interp", "steer", "site")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
EXAMPLES = {
    "default": DEFAULT_CONFIG,
    "gpt2-small-resid8-topk": CONFIG_DIR / "gpt2_small_resid8_topk.yaml",
    "pythia-70m-mlp-transcoder": CONFIG_DIR / "pythia70m_mlp_transcoder.yaml",
    "gemma-2-2b-resid-jumprelu-16k": CONFIG_DIR / "gemma2_2b_resid_jumprelu_16k.yaml",
}
"""Configs shipped in the package: `sae-kit run NAME` runs one (`default` is what a bare `sae-kit run` runs)."""

# Library-config fields each section may not set, and where the value comes from instead.
OWNED: dict[str, dict[str, str]] = {
    "cache": {"model": "the top-level `model`", "backend": "the top-level `backend`", "device": "the top-level `device`",
              "out": "the top-level `out` (the store goes to OUT/cache/activations)", "seed": "the top-level `seed`"},
    "train": {"activations": "the cache stage (OUT/cache/activations)", "model": "the top-level `model`",
              "device": "the top-level `device`", "out": "the top-level `out` (SAEs go to OUT/train/<name>/)",
              "dataset": "`cache.dataset`", "dataset_name": "`cache.dataset.name`",
              "text_column": "`cache.dataset.text_column`", "context_size": "`cache.dataset.context_size`"},
    "eval": {"sae_paths": "the train stage (every SAE it trains)", "out": "the top-level `out` (OUT/eval/<SAE>/)",
             "model": "the top-level `model`", "device": "the top-level `device`", "backend": "the top-level `backend`"},
    "interp": {"sae_path": "the train stage (every SAE it trains)", "out": "the top-level `out` (OUT/interp/<SAE>/)",
               "model": "the top-level `model`", "device": "the top-level `device`", "backend": "the top-level `backend`",
               "seed": "the top-level `seed`", "progress": "the --no-progress flag", "overwrite": "the pipeline (it "
               "redoes a stage whose config changed)"},
}

TRAIN_NEUTRAL = ("checkpoint_every", "log_every", "wandb", "wandb_project", "distribute_modules", "device")
"""TrainConfig fields that do not change the trained SAEs: left out of the train stage's content hash."""
INTERP_NEUTRAL = ("workers", "embed_chunk", "device", "progress", "overwrite", "retry_failed")
"""InterpConfig fields that do not change the results: left out of the interp stage's content hash."""


@dataclass(frozen=True)
class SteerSection:
    """The steering demo: sweep the best-explained latents of each SAE and compare with the unsteered model."""

    n_latents: int = 2
    """How many of each SAE's best-explained latents (highest interp score) to steer."""
    prompts: tuple[str, ...] = ("def __init__(self",)
    """Prompts to continue."""
    strengths: tuple[float, ...] = (0.0, 2.0, 4.0, 8.0)
    """Strengths swept: for add, multiples of the latent's max activation; for clamp, activation values. 0 is the
    unsteered reference."""
    mode: str = "add"
    """add, clamp or ablate."""
    positions: str = "all"
    """Tokens edited: 'all', 'last' or 'i:j'."""
    max_new_tokens: int = 24
    """Tokens generated per continuation."""
    seeds: tuple[int, ...] = (0,)
    """Generation seeds (one continuation each)."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    concept_score: bool = True
    """Score each continuation by embedding similarity to the latent's explanation."""

    def __post_init__(self) -> None:
        from sae_kit.steering import MODES, parse_positions
        from sae_kit.steering.interventions import check_strength, check_temperature

        object.__setattr__(self, "prompts", tuple(self.prompts))
        for s in self.strengths:  # checked here, not when the steer stage runs after cache, train, eval and interp
            check_strength(s)
        object.__setattr__(self, "strengths", tuple(float(s) for s in self.strengths))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if self.n_latents < 0:
            raise ValueError(f"n_latents must be >= 0, got {self.n_latents}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise ValueError("prompts must be a non-empty list of non-empty strings")
        if not self.strengths or not self.seeds:
            raise ValueError("strengths and seeds must each hold at least one value")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        check_temperature(self.temperature)
        parse_positions(self.positions)


@dataclass(frozen=True)
class SiteSection:
    """The results site (OUT/index.html)."""

    title: str | None = None
    """Page title; None names the model and the config file."""


@dataclass(frozen=True)
class InterpSection:
    """Pipeline-level settings of the interp stage, beside the InterpConfig fields of the same section."""

    control: bool = True
    """Also score random directions with the SAE's norms (the same run on `random_directions_like(sae)`), the
    baseline each SAE's interp score is compared with."""


@dataclass(frozen=True)
class RunConfig:
    """A whole `sae-kit run`: the shared settings and every stage's library config (templates where the stage
    runs once per SAE)."""

    source: str
    """The config file read ("<default>" for the embedded one)."""
    out: str
    """Output folder of the run."""
    model: str
    """Model name or path, shared by every stage."""
    backend: str
    """Hook-name backend, shared by every stage."""
    device: str | None
    """Torch device; None picks CUDA when present."""
    seed: int
    """Seed of every stage that draws random numbers (unless a train entry sets its own)."""
    cache: CacheConfig
    """The cache stage (writes OUT/cache/activations)."""
    train: tuple[TrainConfig, ...]
    """One training pass per entry (a pass may sweep several SAEs), each into OUT/train/<name>/."""
    eval: dict[str, Any]
    """EvalConfig fields other than sae_paths / out (one eval per SAE)."""
    interp: dict[str, Any]
    """InterpConfig fields other than sae_path / out / control (one run per SAE, plus its control)."""
    interp_control: InterpSection = field(default_factory=InterpSection)
    """Pipeline-level interp settings."""
    steer: SteerSection = field(default_factory=SteerSection)
    """The steering demo."""
    site: SiteSection = field(default_factory=SiteSection)
    """The results site."""

    @property
    def torch_device(self) -> str:
        """The device every stage runs on: `device`, else CUDA when present, else the CPU."""
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def stage_dir(self, stage: str) -> Path:
        """Folder of one stage."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid: {list(STAGES)}")
        return Path(self.out) / stage

    def eval_config(self, sae_path: str | Path, out: str | Path) -> Any:
        """The EvalConfig of one SAE."""
        from evals.evaluate import EvalConfig

        return EvalConfig(sae_paths=(str(sae_path),), out=str(out), model=self.model, backend=self.backend,
                          device=self.torch_device, **self.eval)

    def interp_config(self, sae_path: str | Path, out: str | Path, control: bool, progress: bool = True) -> Any:
        """The InterpConfig of one SAE (or of its random-direction control)."""
        from autointerp.pipeline import InterpConfig
        from autointerp.records import RecordConfig

        values = dict(self.interp)
        records = values.pop("records", {})
        records = records if isinstance(records, RecordConfig) else RecordConfig(**{"seed": self.seed, **records})
        return InterpConfig(sae_path=str(sae_path), out=str(out), model=self.model, backend=self.backend,
                            device=self.torch_device, seed=self.seed, records=records, progress=progress,
                            control="random-directions" if control else "none", **values)

    def sae_names(self) -> list[str]:
        """Every SAE of the run, in training order (names are their folders under OUT/train/<pass>/)."""
        return [spec.name for cfg in self.train for spec in cfg.specs(cfg.hook_points[0] if cfg.hook_points else None)]


def as_dict(obj: Any) -> Any:
    """Plain JSON-able data of a config (dataclasses, tuples as lists), for content hashes and printing."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): as_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    return obj
