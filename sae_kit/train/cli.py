"""`sae-kit train`: flags (and an optional YAML/TOML config file) → TrainConfig → train().

    sae-kit train --activations DIR [--hook H] --arch topk --k 32 --expansion 16 --tokens N --out OUT
    sae-kit train --model M --hook H --dataset D ...            # streaming: no disk cache
    sae-kit train ... --k 16,32,64 --lr 1e-4,3e-4               # a sweep: one SAE per combination, one pass
    torchrun --nproc_per_node 2 -m sae_kit.cli train ...        # data parallel (gloo on CPU, NCCL on CUDA)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from sae_kit.train.config import ARCHITECTURES, DTYPES, LR_DECAYS, TrainConfig

# flag dest → TrainConfig field, where the names differ
RENAMES = {"arch": "architecture", "hook": "hook_points", "target_hook": "target_hook_points", "tokens": "n_tokens",
           "skip": "skip_connection", "dataset_config": "dataset_name"}
STREAM_ONLY = ("model", "dataset", "dataset_config", "text_column", "context_size")
"""Flags (and config-file keys) that choose what streaming mode reads."""
NOT_FIELDS = {"config", "resume", "command", "verbose", "no_progress", "seeds"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sae-kit train`; unset flags fall back to the config file, then to TrainConfig defaults."""
    d = TrainConfig()
    p = parser.add_argument
    p("--config", help="YAML or TOML file whose keys are TrainConfig fields (and a `sweep:` section); flags override it")
    data = parser.add_argument_group("activations")
    data.add_argument("--activations", help="folder written by `sae-kit cache` (omit to stream from --model)")
    data.add_argument("--model", help=f"model for streaming mode (default: {d.model})")
    data.add_argument("--hook", action="append", metavar="H",
                      help="input hook point; repeat or comma-separate for one SAE per hook point "
                           "(default: the store's only one; blocks.2.hook_resid_post when streaming)")
    data.add_argument("--dataset", help=f"text source for streaming mode (default: {d.dataset})")
    data.add_argument("--dataset-config", help="hub dataset configuration name when streaming (e.g. wikitext-103-raw-v1)")
    data.add_argument("--text-column", help=f"column holding the text when streaming (default: {d.text_column})")
    data.add_argument("--context-size", type=int, help=f"tokens per context when streaming (default: {d.context_size})")
    sae = parser.add_argument_group("SAE (comma-separated values of k, expansion, d-sae, lr, sparsity-coefficient sweep)")
    sae.add_argument("--arch", choices=ARCHITECTURES, help=f"architecture (default: {d.architecture})")
    sae.add_argument("--k", help=f"active latents per token (default: {d.k})")
    sae.add_argument("--expansion", help=f"d_sae = expansion × d_in (default: {d.expansion})")
    sae.add_argument("--d-sae", help="number of latents (overrides --expansion)")
    sae.add_argument("--transcoder", action="store_true", default=None, help="map --hook to --target-hook")
    sae.add_argument("--target-hook", action="append", metavar="H2",
                     help="transcoder target hook point paired with each --hook (e.g. blocks.2.hook_mlp_out)")
    sae.add_argument("--skip", action="store_true", default=None, help="skip transcoder: add a linear skip path")
    sae.add_argument("--sparsity-coefficient", help="final λ for jumprelu / relu / gated")
    sae.add_argument("--target-l0", type=float, help="jumprelu: the penalty is λ·(L0/target − 1)² instead of λ·L0 (still needs λ > 0)")
    sae.add_argument("--k-aux", type=int, help="dead latents used by AuxK (default: d_out // 2, i.e. d_in // 2 for an SAE)")
    sae.add_argument("--matryoshka-widths", metavar="W1,W2,...",
                     help="matryoshka_batchtopk: nested dictionary sizes, increasing, the last = d_sae "
                          "(default: d/32, 3d/32, 7d/32, 15d/32, d)")
    sae.add_argument("--mp-residual-threshold", type=float,
                     help=f"matching_pursuit: stop a row at this fraction of ‖x − b_dec‖ (default: {d.mp_residual_threshold})")
    sae.add_argument("--kron-m", type=int, help=f"kron: pre-latents per head, first factor (default: {d.kron_m})")
    sae.add_argument("--kron-n", type=int, help=f"kron: pre-latents per head, second factor (default: {d.kron_n})")
    sae.add_argument("--adaptivek-min-k", type=int, help="adaptivek: fewest latents per token (default: k // 4)")
    sae.add_argument("--adaptivek-max-k", type=int, help="adaptivek: most latents per token (default: 4·k)")
    sae.add_argument("--dead-tokens-threshold", type=int,
                     help=f"tokens without firing before a latent counts as dead (default: {d.dead_tokens_threshold:,})")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--tokens", type=int, help=f"training tokens (default: {d.n_tokens:,})")
    opt.add_argument("--batch-size", type=int, help=f"rows per step, over all ranks (default: {d.batch_size})")
    opt.add_argument("--micro-batches", type=int, help="split each batch to save memory (default: 1)")
    opt.add_argument("--lr", help="peak learning rate (default: 2e-4 / sqrt(d_sae / 16384))")
    opt.add_argument("--lr-decay", choices=LR_DECAYS, help=f"decay after --decay-start (default: {d.lr_decay})")
    opt.add_argument("--decay-start", type=float, help=f"fraction of training before decay (default: {d.decay_start})")
    opt.add_argument("--warmup-steps", type=int, help=f"LR warm-up steps (default: {d.warmup_steps})")
    opt.add_argument("--grad-clip", type=float, help=f"gradient-norm clip, 0 disables (default: {d.grad_clip})")
    opt.add_argument("--seed", type=int, help=f"initialisation and data-order seed (default: {d.seed})")
    opt.add_argument("--seeds", help="initialisation seeds swept in one pass, e.g. 0,1 for a consistency pair "
                                     "(same data order: --seed)")
    run = parser.add_argument_group("output and hardware")
    run.add_argument("--out", help=f"output folder; each SAE goes to OUT/NAME (default: {d.out})")
    run.add_argument("--name", help="base of the SAE folder names (default: the architecture)")
    run.add_argument("--checkpoint-every", type=int, help="tokens between checkpoints (default: 0, none)")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT")
    run.add_argument("--log-every", type=int, help=f"steps between metrics.jsonl lines (default: {d.log_every})")
    run.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    run.add_argument("--dtype", choices=DTYPES, help="encoder precision: bfloat16 (bf16 product, tensor cores on CUDA, selection from bf16 "
                     "pre-activations), float32, or auto = bfloat16 on CUDA, float32 elsewhere (default: auto); "
                     "weights and Adam state stay float32")
    run.add_argument("--distribute-modules", action="store_true", default=None,
                     help="with several ranks, give each rank whole SAEs instead of slicing every batch")
    run.add_argument("--wandb", action="store_true", default=None, help="also log to Weights & Biases")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_config_file(path: str) -> dict[str, Any]:
    """Mapping of TrainConfig fields from a .yaml/.yml/.toml file."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if file.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(file.read_text()) or {}
    elif file.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # tomllib is 3.11+; tomli is the same parser, declared for older Pythons
            import tomli as tomllib

        data = tomllib.loads(file.read_text())
    else:
        raise ValueError(f"config file must be .yaml, .yml or .toml, got {path}")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of TrainConfig fields")
    return data


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, the config file and the flags (in that order of precedence, lowest first)."""
    values = read_config_file(args.config) if args.config else {}
    for alias, name in (("hook_point", "hook_points"), ("target_hook_point", "target_hook_points")):
        if alias in values and name not in values:
            values[name] = values.pop(alias)
    for key, value in vars(args).items():
        if key in NOT_FIELDS or value is None:
            continue
        field = RENAMES.get(key, key)
        if key in ("hook", "target_hook"):  # repeated and/or comma-separated
            value = [h.strip() for v in value for h in v.split(",") if h.strip()]
        values[field] = value
        # A flag replaces the file's sweep of the same field too.
        if isinstance(values.get("sweep"), dict):
            values["sweep"].pop(field, None)
    if args.seeds is not None:
        sweep = values.get("sweep") if isinstance(values.get("sweep"), dict) else {}
        values["sweep"] = {**sweep, "seed": args.seeds}
    if values.get("activations") is not None:
        # The store fixed these when it was cached; taking them silently would record a dataset never read.
        given = [f"--{k.replace('_', '-')}" if getattr(args, k, None) is not None else RENAMES.get(k, k)
                 for k in STREAM_ONLY if values.get(RENAMES.get(k, k)) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to streaming mode; with --activations the store's own "
                             f"model and text are used (drop them, or drop --activations to stream)")
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    """Train and print where each SAE was saved."""
    from sae_kit.train.loop import train_all

    cfg = config_from_args(args)
    try:
        paths = train_all(cfg, resume=args.resume, progress=not args.no_progress)
    except FloatingPointError as err:
        print(f"sae-kit train: error: {err}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the paths; say it once
        for path in paths:
            print(f"saved {path}")
    return 0


def interrupted(args: argparse.Namespace, err: KeyboardInterrupt) -> str:
    """The Ctrl-C line: the step reached and what re-running does (resume from the last checkpoint, or start over)."""
    from sae_kit.train.loop import TrainingInterrupted

    if not isinstance(err, TrainingInterrupted):
        return "interrupted before training started; nothing was written (re-run the same command)"
    head = f"interrupted at step {err.step} of {err.n_steps}"
    if err.checkpoint_step is not None:
        return f"{head}; the last checkpoint is step {err.checkpoint_step} (continue with --resume)"
    how = (f"the first comes after {err.checkpoint_every:,} tokens" if err.checkpoint_every
           else "pass --checkpoint-every TOKENS to save some")
    return f"{head}; nothing was saved (no checkpoint yet: {how}); re-running the same command starts over"
