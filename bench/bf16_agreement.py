"""How far bf16 top-k selection is from fp32 on a trained SAE and its real activations (the README's figures).

torch's CPU bf16 matmul rounds both operands to bf16 and accumulates in fp32, as CUDA tensor cores do, so the
`--dtype bfloat16` selection can be measured without a GPU. Prints, over N rows of a cached store: the share of
each row's top-k indices that bf16 and fp32 pick alike, the FVU of each, and the largest relative error of the
selected values; then, for the exact fp32 selection through a bf16 product (`kernels.bf16_rescored_topk`, CUDA's
path under SAE_KIT_BF16_PRESELECT=1), how many candidates per row its bound leaves to recompute in fp32.

    python bench/bf16_agreement.py --sae runs/quality/saes/topk --activations runs/quality/acts [--rows 16384]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from activation_store import ActivationStore
from sae_kit.sae import SparseCoder, kernels
from sae_kit.sae.topk import TopKSAE


def agreement(sae: TopKSAE, x: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """Share of equal top-k indices, FVU under each precision and the max relative value error, over rows x."""
    same, n, err_num, err_den, max_rel = 0.0, 0, 0.0, 0.0, 0.0
    sq_err = {"fp32": 0.0, "bf16": 0.0}
    total = ((x - x.mean(0)) ** 2).sum().item()
    with torch.no_grad():
        for rows in x.split(chunk):
            fp32 = sae(rows)
            with sae.training_precision(torch.bfloat16):
                bf16 = sae(rows)
            a, b = fp32.latent_indices, bf16.latent_indices  # (n, k)
            same += (b.unsqueeze(-1) == a.unsqueeze(-2)).any(-1).float().sum().item()
            n += a.numel()
            # values of the latents both picked, relative to fp32's
            both = (b.unsqueeze(-1) == a.unsqueeze(-2))  # (n, k_b, k_a)
            va = fp32.latent_acts.unsqueeze(-2).expand_as(both)[both]
            vb = bf16.latent_acts.unsqueeze(-1).expand_as(both)[both]
            rel = ((vb - va).abs() / va.abs().clamp_min(1e-6))
            max_rel = max(max_rel, float(rel.max()) if rel.numel() else 0.0)
            err_num += float((vb - va).abs().sum())
            err_den += float(va.abs().sum())
            for name, out in (("fp32", fp32), ("bf16", bf16)):
                sq_err[name] += float(out.fvu) * ((rows - rows.mean(0)) ** 2).sum().item()
    return {"same_indices": same / n, "fvu_fp32": sq_err["fp32"] / total, "fvu_bf16": sq_err["bf16"] / total,
            "mean_rel_value_error": err_num / err_den, "max_rel_value_error": max_rel}


def rescoring(sae: TopKSAE, x: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """Work of `bf16_rescored_topk` (fp32 dot products per row, in units of k) and how its selection compares with
    the fp32 product's: rows that differ, and the largest fp64 gap (relative) between latents they swap."""
    widths: list[tuple[int, int]] = []  # (rows, candidates per row) of each sampled call
    real = kernels._sampled_product

    def spy(rows: torch.Tensor, W: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        widths.append(tuple(cols.shape))
        return real(rows, W, cols)

    kernels._sampled_product = spy
    try:
        with torch.no_grad():
            xc = sae.encoder_input(x)
            _, idx = kernels.bf16_rescored_topk(xc, sae.W_enc, sae.b_enc, sae.cfg.k, chunk, sae.by_magnitude)
            fp32 = sae.row_topk(xc, None, sae.cfg.k).indices
    finally:
        kernels._sampled_product = real
    differ = (idx != fp32).any(1).nonzero().squeeze(1)
    gap = 0.0
    for r in differ.tolist():  # fp64 values of what one picked and the other did not
        pre = (xc[r].double() @ sae.W_enc.double() + sae.b_enc.double()).detach()
        ours, theirs = set(idx[r].tolist()), set(fp32[r].tolist())
        a, b = pre[list(ours - theirs)], pre[list(theirs - ours)]
        gap = max(gap, float((a.max() - b.min()).abs() / b.abs().min()) if a.numel() else 0.0)
    return {"dots_per_row": sum(r * c for r, c in widths) / len(x) / sae.cfg.k,
            "widest": max((c for _, c in widths), default=0) / sae.cfg.k,
            "rows_differ": len(differ), "max_rel_gap": gap}


def main() -> None:
    """Load, measure, print."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sae", required=True)
    p.add_argument("--activations", required=True)
    p.add_argument("--rows", type=int, default=16_384)
    args = p.parse_args()
    sae = SparseCoder.load(args.sae)
    if not isinstance(sae, TopKSAE):
        raise SystemExit(f"{args.sae} is a {sae.cfg.architecture} SAE; bf16 selection applies to the TopK family")
    store = ActivationStore.open(args.activations)
    hook = sae.cfg.hook_point
    x = next(iter(store.batches([hook], batch_size=args.rows, seed=0)))[hook].float()
    sae.train()  # the training forward: the selection the step makes
    r = agreement(sae, x)
    print(f"{args.sae} ({sae.cfg.architecture}, d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}, k {sae.cfg.k}), "
          f"{len(x):,} rows of {hook}:")
    print(f"  equal top-k indices {100 * r['same_indices']:.2f}%; FVU fp32 {r['fvu_fp32']:.4f}, bf16 "
          f"{r['fvu_bf16']:.4f} ({100 * (r['fvu_bf16'] / r['fvu_fp32'] - 1):+.2f}%); selected values' relative "
          f"error mean {r['mean_rel_value_error']:.2e}, max {r['max_rel_value_error']:.2e}")
    e = rescoring(sae, x)
    print(f"  exact fp32 through bf16: {e['dots_per_row']:.1f}·k fp32 dot products per row (widest pass "
          f"{e['widest']:.1f}·k); {e['rows_differ']} rows select otherwise than the fp32 product"
          + (f" (near-ties: fp64 values {e['max_rel_gap']:.1e} apart, relative)" if e["rows_differ"] else ""))

if __name__ == "__main__":
    main()
