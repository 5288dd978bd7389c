"""`sae-kit push SRC REPO_ID`: upload an SAE to the Hugging Face hub with a generated model card."""
from __future__ import annotations

import argparse
import sys

from sae_kit.formats.cli_convert import add_loading_arguments, load_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sae-kit push`."""
    from sae_kit.formats import WRITERS

    parser.add_argument("src", metavar="SRC", help="SAE folder (any supported format), hub id or 'release:sae_id'")
    parser.add_argument("repo_id", metavar="REPO_ID", help="hub repo to create or update ('org/name')")
    parser.add_argument("--format", default="sae-kit", choices=list(WRITERS),
                        help="layout of the uploaded files (default: %(default)s)")
    parser.add_argument("--path-in-repo", help="folder inside the repo (default: its root)")
    parser.add_argument("--metrics", help="metrics.json of `sae-kit eval` for the model card (default: SRC/metrics.json)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    add_loading_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Push; returns the exit code."""
    from sae_kit.hub import PushError

    coder = load_from_args(args, args.src)
    try:
        url = coder.push_to_hub(args.repo_id, format=args.format, path_in_repo=args.path_in_repo, metrics=args.metrics,
                                private=args.private or None)
    except PushError as err:
        print(f"sae-kit push: error: {err}", file=sys.stderr)
        return 1
    print(f"pushed to {url}")
    return 0
