"""Feature recovery on ground truth: every architecture trained on the same synthetic activations in superposition.

The data come from `activation_store.synthetic` (true features: 8·d random unit directions, Zipf firing
probabilities, noisy magnitudes; `--correlation` and `--parents` add correlated and hierarchical features). Every
architecture trains through `sae_kit.train` with the default settings (LR from d_sae, batch 4096, linear decay), the
same k (the true mean number of active features, rounded), d_sae = 2 × the true features, on the same rows. The
ones without a k get the sparsity settings below, which put their L0 near k. Printed per architecture, on held-out
rows: MCC (mean |cos| of the Hungarian matching between the decoder rows and the true features; a random decoder's
score is printed as chance), FVU, L0, dead % (latents that never fire on the held-out rows), training seconds.

    python bench/synthetic.py [--d 64] [--tokens 2000000] [--correlation 0.5] [--parents 32] [--archs topk,kron]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from activation_store.synthetic import SyntheticActivations, SyntheticConfig, recovery_mcc
from sae_kit.sae import SparseCoder
from sae_kit.train import TensorSource, TrainConfig, train_all

ARCHS = ("topk", "batchtopk", "abstopk", "jumprelu", "relu", "matryoshka_batchtopk", "gated", "matching_pursuit",
         "kron", "adaptivek")
SPARSITY = {
    "jumprelu": {"target_l0": None, "sparsity_coefficient": 1.0, "jumprelu_bandwidth": 0.05},
    "relu": {"sweep": {"sparsity_coefficient": [0.03, 0.1]}},
    "gated": {"sweep": {"sparsity_coefficient": [0.03, 0.1]}},
}
"""Architectures without a k: JumpReLU in its target-L0 form (target k; ε as in bench/sae_quality.py); ReLU-L1 and
Gated, whose L0 is not set directly, with two λ in one pass (both rows are printed)."""


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=64, help="activation width")
    p.add_argument("--features", type=int, default=None, help="true features (default 8·d)")
    p.add_argument("--mean-active", type=float, default=4.0, help="true features firing per row on average")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the firing probabilities")
    p.add_argument("--correlation", type=float, default=0.0, help="firing correlation within groups of 8")
    p.add_argument("--parents", type=int, default=0, help="parent features, each with --children children")
    p.add_argument("--children", type=int, default=4)
    p.add_argument("--rows", type=int, default=1 << 18, help="training rows (repeated in epochs up to --tokens)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="training rows per SAE")
    p.add_argument("--eval-rows", type=int, default=1 << 15)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the rows to this file")
    return p.parse_args()


def main() -> None:
    """Generate, train every architecture, evaluate, print the table."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    syn = SyntheticActivations(SyntheticConfig(
        d=args.d, n_features=args.features, mean_active=args.mean_active, zipf_exponent=args.zipf,
        correlation=args.correlation, n_parents=args.parents, children_per_parent=args.children, seed=args.seed))
    gen = torch.Generator().manual_seed(args.seed)
    x_train = syn.sample(args.rows, gen)
    x_eval = syn.sample(args.eval_rows, gen)
    k = max(1, round(args.mean_active))
    d_sae = 2 * syn.n_features
    print(f"synthetic: d {args.d}, {syn.n_features} true features, {args.mean_active} active per row on average "
          f"(Zipf α {args.zipf}, correlation {args.correlation}, {args.parents} parents × {args.children} children); "
          f"SAEs: d_sae {d_sae}, k {k}, {args.tokens:,} training rows, {torch.get_num_threads()} threads", flush=True)
    chance = recovery_mcc(syn.features, torch.randn(d_sae, args.d, generator=gen))
    print(f"chance: a random decoder of {d_sae} rows scores MCC {chance:.3f}", flush=True)
    rows = []
    out = Path(tempfile.mkdtemp(prefix="sae-synthetic-"))
    for arch in args.archs.split(","):
        extra = dict(SPARSITY.get(arch, {}))
        if "target_l0" in extra:
            extra["target_l0"] = float(k)
        cfg = TrainConfig(hook_points="x", architecture=arch, k=k, d_sae=d_sae, n_tokens=args.tokens,
                          out=str(out / arch), seed=args.seed, **extra)
        start = time.perf_counter()
        paths = train_all(cfg, TensorSource({"x": x_train}), progress=False)
        seconds = time.perf_counter() - start
        for path in paths:
            sae = SparseCoder.load(path)
            with torch.no_grad():
                z = torch.cat([sae.encode(x_eval[i:i + 4096]) for i in range(0, len(x_eval), 4096)])
                recon = sae.decode(z)
            fvu = float((x_eval - recon).pow(2).sum() / (x_eval - x_eval.mean(0)).pow(2).sum())
            name = arch + (f" (λ={sae.cfg.sparsity_coefficient:g})" if len(paths) > 1 else "")
            row = {"architecture": name, "mcc": recovery_mcc(syn.features, sae.W_dec), "fvu": fvu,
                   "l0": float((z != 0).sum(1).float().mean()),
                   "dead_pct": 100 * float(((z != 0).sum(0) == 0).float().mean()), "train_seconds": seconds}
            rows.append(row)
            print(f"{name}: MCC {row['mcc']:.3f}, FVU {fvu:.3f}, L0 {row['l0']:.1f}, {seconds:.0f} s", flush=True)
    lines = ["| architecture | MCC | FVU | L0 | dead % | train s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['architecture']} | {r['mcc']:.3f} | {r['fvu']:.3f} | {r['l0']:.1f} | {r['dead_pct']:.1f} | "
                     f"{r['train_seconds']:.0f} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "chance_mcc": chance, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
