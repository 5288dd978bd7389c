"""`sae-kit eval`: parse flags into an EvalConfig and call `evals.evaluate.run_eval`."""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sae-kit eval`."""
    parser.add_argument("--sae", nargs="+", required=True, metavar="SAE",
                        help="SAE / transcoder folders of any supported format (sae-kit, SAELens, sparsify, Gemma "
                             "Scope, ...), hub ids 'org/repo[/folder]' or 'release:sae_id'; several on one hook point "
                             "give a sweep view")
    parser.add_argument("--model", default=None,
                        help="model name or path (default: the one recorded in each SAE's cfg.json)")
    parser.add_argument("--dataset", default=None,
                        help="dataset path (default: the one recorded in the SAE's metadata); its held-out "
                             "split is always used")
    parser.add_argument("--tokens", type=int, default=65_536, help="held-out tokens to evaluate on")
    parser.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass")
    parser.add_argument("--context-size", type=int, default=None,
                        help="tokens per context (default: the SAE's training context size, else 128)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--backend", default="auto", choices=["auto", "transformer_lens", "hf"],
                        help="model backend")
    parser.add_argument("--dense-threshold", type=float, default=0.1,
                        help="latents firing on more than this fraction of tokens count as dense")
    parser.add_argument("--include-special-tokens", action="store_true",
                        help="also splice and measure at BOS/EOS/pad positions")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--out", required=True, help="output folder for metrics.json and report.html")


def run(args: argparse.Namespace) -> int:
    """Run the eval; returns the exit code."""
    from evals.evaluate import METRICS_FILENAME, REPORT_FILENAME, EvalConfig, run_eval

    cfg = EvalConfig(
        sae_paths=tuple(args.sae), out=args.out, n_tokens=args.tokens, model=args.model, dataset=args.dataset,
        batch_size=args.batch_size, context_size=args.context_size, device=args.device, backend=args.backend,
        dense_threshold=args.dense_threshold, exclude_special_tokens=not args.include_special_tokens,
    )
    out = run_eval(cfg, progress=not args.no_progress)
    print(f"wrote {out / METRICS_FILENAME} and {out / REPORT_FILENAME}")
    return 0
