"""The `sae-kit` command: one thin face over the four packages.

Each subcommand lives beside the library code it drives, in a module with `add_arguments(parser)` and
`run(args) -> int` (and, optionally, `interrupted(args, err) -> str`, its one-line Ctrl-C message); this dispatcher
imports only the one that is asked for, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name → (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "hooks": ("activation_store.cli_hooks", "list a model's hook points and their widths"),
    "cache": ("activation_store.cli_cache", "capture activations at hook points into a sharded on-disk store"),
    "train": ("sae_kit.train.cli", "train SAEs or transcoders on cached or streamed activations"),
    "eval": ("evals.cli", "evaluate saved SAEs and write metrics.json and report.html"),
    "interp": ("autointerp.cli", "explain latents with an LLM and score the explanations"),
    "steer": ("evals.cli_steer", "steer generation with SAE features and measure the effect"),
    "convert": ("sae_kit.formats.cli_convert", "convert an SAE between formats (sae-kit, SAELens, sparsify)"),
    "push": ("sae_kit.formats.cli_push", "upload an SAE to the Hugging Face hub with a model card"),
    "run": ("sae_kit.pipeline.cli", "run the whole pipeline from one config: cache, train, eval, interp, steer, site"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with `only`, the named subcommand's module is imported and its flags added."""
    parser = argparse.ArgumentParser(
        prog="sae-kit",
        description="Sparse autoencoders and transcoders for language-model interpretability.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"sae-kit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # Ctrl-C is the user's choice, not a bug: one line saying what was kept and what a re-run does, and the
        # shell's exit code for SIGINT. Outputs need no cleanup (every command writes atomically). Under torchrun
        # every rank gets the signal; rank 0 speaks for all, and no rank waits on another here.
        describe = getattr(module, "interrupted", None)
        if os.environ.get("RANK", "0") == "0":
            print(f"sae-kit {args.command}: {describe(args, err) if describe else 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
