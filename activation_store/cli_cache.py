"""`sae-kit cache`: capture activations at hook points into a sharded, resumable store."""
from __future__ import annotations

import argparse
import sys

from activation_store.model import BACKENDS, REFERENCE_NAME
from activation_store.storage import is_disk_full
from activation_store.store import DTYPES, CacheConfig, cache_activations
from activation_store.tokens import DatasetConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sae-kit cache`."""
    d, dd = CacheConfig(), DatasetConfig()
    parser.add_argument("--model", default=REFERENCE_NAME, help="hub name, local folder or 'reference' (default)")
    parser.add_argument("--hook", action="append", dest="hooks", metavar="H",
                        help=f"hook point to capture; repeat for several (default: {d.hook_points[0]})")
    parser.add_argument("--dataset", default=dd.path, help="'stdlib' (default), a hub dataset or local files")
    parser.add_argument("--dataset-config", default=None,
                        help="hub dataset configuration name, e.g. sample-10BT for HuggingFaceFW/fineweb (default: none)")
    parser.add_argument("--text-column", default=dd.text_column, help="column holding the text (default: text)")
    parser.add_argument("--split", default=dd.split, choices=("train", "eval"), help="document split (default: train)")
    parser.add_argument("--eval-percent", type=int, default=dd.eval_percent,
                        help=f"share of documents held out for --split eval (default: {dd.eval_percent}); "
                             "the stdlib's split is fixed")
    parser.add_argument("--tokens", type=int, default=d.n_tokens, help=f"tokens to run (default: {d.n_tokens})")
    parser.add_argument("--shuffle-seed", type=int, default=None,
                        help="read documents in an order shuffled with this seed, so the tokens sample the whole "
                             "corpus (default: source order)")
    parser.add_argument("--context-size", type=int, default=dd.context_size,
                        help="tokens per context (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="contexts per forward pass (default: %(default)s)")
    parser.add_argument("--shard-tokens", type=int, default=d.shard_tokens,
                        help="target tokens per shard (default: %(default)s)")
    parser.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="stored dtype (default: float32)")
    parser.add_argument("--backend", default=d.backend, choices=BACKENDS, help="hook-name backend (default: auto)")
    parser.add_argument("--no-exclude-special", action="store_true", help="keep rows of BOS/EOS/pad tokens")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    parser.add_argument("--out", default=d.out, help="output folder or fsspec URL (default: activations)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> CacheConfig:
    """The CacheConfig the flags describe."""
    dataset = DatasetConfig(path=args.dataset, name=args.dataset_config, text_column=args.text_column,
                            split=args.split, eval_percent=args.eval_percent, context_size=args.context_size,
                            shuffle_seed=args.shuffle_seed)
    return CacheConfig(
        model=args.model, backend=args.backend, hook_points=tuple(args.hooks or CacheConfig().hook_points),
        dataset=dataset, n_tokens=args.tokens, batch_size=args.batch_size, shard_tokens=args.shard_tokens,
        dtype=args.dtype, out=args.out, exclude_special=not args.no_exclude_special, device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    """Cache the activations and print where they went."""
    cfg = config_from_args(args)
    try:
        out = cache_activations(cfg, progress=not args.no_progress)
    except OSError as err:
        if not is_disk_full(err):
            raise
        print(f"sae-kit cache: error: {err.strerror or err}", file=sys.stderr)
        return 1
    from activation_store.store import ActivationStore

    store = ActivationStore.open(out, verify=False)
    shards = len(store.manifest["shards"])
    print(f"{out}: {store.n_rows} rows × {len(store.hook_points)} hook point(s) in {shards} shard(s), complete")
    return 0


def interrupted(args: argparse.Namespace, err: KeyboardInterrupt) -> str:
    """The Ctrl-C line: finished shards are kept and the same command resumes after them."""
    return (f"interrupted; the finished shards in {args.out} are kept, and re-running the same command continues "
            "after the last of them")
