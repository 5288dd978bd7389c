"""`sae-kit run [CONFIG]`: the whole pipeline from one YAML file (the embedded default when none is given).

    sae-kit run                          # the default: offline, on the embedded reference model
    sae-kit run my.yaml --out runs/x     # your config; re-running redoes only what changed
    sae-kit run --check my.yaml          # validate the config and show what would run, compute nothing
    sae-kit run --print-config > my.yaml # start your own from the default
"""
from __future__ import annotations

import argparse
import sys

from sae_kit.pipeline.config import EXAMPLES, STAGES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sae-kit run`."""
    parser.add_argument("config", nargs="?", default=None,
                        help=f"YAML config file, or a shipped one by name ({', '.join(EXAMPLES)}); "
                             "default: the embedded default config")
    parser.add_argument("--out", default=None, help="output folder (overrides the config's `out`)")
    parser.add_argument("--device", default=None, help="torch device (overrides the config's `device`)")
    parser.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and print what each stage would do; compute nothing")
    parser.add_argument("--print-config", action="store_true", help="print the config file's text and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Validate the whole config first, then run the stages."""
    from sae_kit.pipeline.validate import load_config, resolve_config_path

    if args.print_config:
        sys.stdout.write(resolve_config_path(args.config).read_text(encoding="utf-8"))
        return 0
    cfg = load_config(args.config, out=args.out, device=args.device)
    from sae_kit.pipeline.run import run_pipeline

    run_pipeline(cfg, progress=not args.no_progress, until=args.until, check=args.check)
    return 0


def interrupted(args: argparse.Namespace, err: KeyboardInterrupt) -> str:
    """The Ctrl-C line: how far a training stage got, and that a re-run skips finished pieces and resumes the rest."""
    from sae_kit.train.loop import TrainingInterrupted

    where = ""
    if isinstance(err, TrainingInterrupted):  # a training pass says how far it got
        saved = f"last checkpoint step {err.checkpoint_step}" if err.checkpoint_step is not None else "no checkpoint"
        where = f" while training, at step {err.step} of {err.n_steps} ({saved})"
    return (f"interrupted{where}; re-running the same command skips the finished pieces and resumes the interrupted "
            "one (the cache after its last shard, training from its last checkpoint, autointerp after its last "
            "latent)")
