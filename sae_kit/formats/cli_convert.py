"""`sae-kit convert SRC DST --to FORMAT`: load an SAE of any supported format and write it in another."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that say where an SAE comes from and what its files do not record (shared with `sae-kit push`)."""
    p = parser.add_argument
    p("--subfolder", help="folder inside SRC (or inside the hub repo) holding the SAE")
    p("--revision", help="hub revision (branch, tag or commit) when SRC is a hub id")
    p("--hook-point", help="hook point, for formats that do not record it (Gemma Scope, OpenAI)")
    p("--target-hook-point", help="hook point a transcoder predicts, for formats that do not record it (Gemma Scope)")
    p("--model", help="model name, for formats that do not record it")
    p("--norm-scaling-factor", type=float,
      help="the factor of an 'expected_average_only_in' normalisation the files do not record")
    p("--trust-remote-pickle", action="store_true",
      help="allow full unpickling of .pt/.bin files that weights_only loading refuses (runs code from the file)")


def load_from_args(args: argparse.Namespace, spec: str):
    """The coder named by `spec` with the loading flags applied."""
    from sae_kit.formats import load

    options = {"hook_point": args.hook_point, "target_hook_point": args.target_hook_point, "model_name": args.model,
               "norm_scaling_factor": args.norm_scaling_factor}
    return load(spec, subfolder=args.subfolder, revision=args.revision, trust_remote_pickle=args.trust_remote_pickle,
                **{k: v for k, v in options.items() if v is not None})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sae-kit convert`."""
    from sae_kit.formats import WRITERS

    parser.add_argument("src", metavar="SRC", help="SAE folder or file of any supported format, a hub id "
                        "('org/repo[/folder]') or 'release:sae_id'")
    parser.add_argument("dst", metavar="DST", help="output folder (must be empty or not exist)")
    parser.add_argument("--to", required=True, choices=list(WRITERS), help="format to write")
    add_loading_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Convert; returns the exit code."""
    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not an empty folder; choose a new DST")
    coder = load_from_args(args, args.src)
    coder.save(dst, format=args.to)
    print(f"wrote {coder.cfg.architecture} ({coder.cfg.d_in}→{coder.cfg.d_sae}) from {args.src} to {dst} as {args.to}")
    return 0
