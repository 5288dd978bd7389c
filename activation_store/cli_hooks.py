"""`sae-kit hooks`: list a model's hook points with their widths."""
from __future__ import annotations

import argparse

from activation_store.model import BACKENDS, REFERENCE_NAME, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sae-kit hooks`."""
    parser.add_argument("--model", default=REFERENCE_NAME, help="hub name, local folder or 'reference' (default)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="hook-name backend (default: auto)")
    parser.add_argument("--filter", default=None, help="only hook points containing this text")


def run(args: argparse.Namespace) -> int:
    """Print one `name<TAB>width` line per hook point in forward order."""
    model = load_model(args.model, backend=args.backend, device="cpu")
    print(f"# {model.name} ({model.backend} backend): hook point, width")
    for name in model.list_hook_points():
        if args.filter is None or args.filter in name:
            print(f"{name}\t{model.hook_points[name]}")
    return 0
