"""`sae-kit train`: flags (and an optional YAML/TOML config file) → TrainConfig → train()."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from sae_kit.train.config import ARCHITECTURES, TrainConfig

# flag → TrainConfig field, for the flags whose names differ from the field
RENAMES = {"arch": "architecture", "hook": "hook_point", "target_hook": "target_hook_point", "tokens": "n_tokens",
           "skip": "skip_connection"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sae-kit train`; unset flags fall back to the config file, then to TrainConfig defaults."""
    p = parser.add_argument
    p("--config", help="YAML or TOML file whose keys are TrainConfig fields; flags override it")
    p("--activations", help="folder written by `sae-kit cache` (omit to stream from --model)")
    p("--model", help="model for streaming mode (default: reference)")
    p("--hook", help="input hook point (needed when the store holds several)")
    p("--dataset", help="text source for streaming mode (default: stdlib)")
    p("--context-size", type=int)
    p("--arch", choices=ARCHITECTURES, help="architecture (default: topk)")
    p("--k", type=int, help="active latents per token (default: 32)")
    p("--expansion", type=int, help="d_sae = expansion × d_in (default: 16)")
    p("--d-sae", type=int, help="number of latents (overrides --expansion)")
    p("--transcoder", action="store_true", default=None, help="map --hook to --target-hook")
    p("--target-hook", help="target hook point of a transcoder (e.g. blocks.2.hook_mlp_out)")
    p("--skip", action="store_true", default=None, help="skip transcoder: add a linear skip path")
    p("--tokens", type=int, help="training tokens (default: 2,000,000)")
    p("--batch-size", type=int, help="rows per step (default: 4096)")
    p("--lr", type=float, help="peak learning rate (default: scaled with d_sae)")
    p("--sparsity-coefficient", type=float, help="λ for jumprelu / relu")
    p("--dead-tokens-threshold", type=int, help="tokens without firing before a latent counts as dead")
    p("--checkpoint-every", type=int, help="tokens between checkpoints (default: only at the end)")
    p("--seed", type=int)
    p("--out", help="output folder (default: runs/sae); the SAE goes to OUT/NAME")
    p("--name", help="subfolder name (default: the architecture)")
    p("--device", help="cpu or cuda (default: cuda when present)")
    p("--resume", action="store_true", help="continue from the last checkpoint in OUT/NAME")


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if file.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(file.read_text()) or {}
    elif file.suffix == ".toml":
        import tomllib

        data = tomllib.loads(file.read_text())
    else:
        raise ValueError(f"config file must be .yaml, .yml or .toml, got {path}")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of TrainConfig fields")
    return data


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, the config file and the flags (in that order of precedence, lowest first)."""
    values = _read_config_file(args.config) if args.config else {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in vars(args).items():
        field = RENAMES.get(key, key)
        if value is not None and field in fields:
            values[field] = value
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    """Train and print where the SAE was saved."""
    from sae_kit.train.loop import train

    path = train(config_from_args(args), resume=args.resume)
    print(f"saved {path}")
    return 0
