"""KronSAE's encoder cost against TopK's at the same d_sae (and the whole training step, for context).

KronSAE's encoder product is x_c W_enc with W_enc (d_in, h·(m+n)), h = d_sae/(m·n): 2·d_in·h·(m+n) FLOPs per token
against TopK's 2·d_in·d_sae, then elementwise products P·Q over the d_sae latents and the same top-k. Timed here,
for each d_sae, on the same fp32 batch:
- "encoder": the fast path's selection without autograd: TopK's `select_active` (the encoder product and the
  top-k, chunked; on CPUs with bf16 matrix units the exact bf16-preselected product) against KronSAE's pre-latent
  product + `select_factored` (head maxima, then the products of the k best heads and their top-k);
- "step": forward + backward + Adam, as `sae-kit train` runs it.
Contenders run interleaved, round after round, one untimed call per contender per round; medians are reported. The
machine is shared: read the ratios, which are measured in the same run.

    python bench/bench_kron.py [--d-sae 8192,32768] [--batch 2048] [--d-in 512] [--k 32] [--m 4] [--n 4] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_kit.sae import SAEConfig, SparseCoder  # noqa: E402
from sae_kit.train.optim import make_optimizer  # noqa: E402


def contenders(x: torch.Tensor, d_sae: int, k: int, m: int, n: int) -> dict[str, Callable[[], object]]:
    """The four timed calls at one d_sae."""
    d_in = x.shape[1]
    topk = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k))
    kron = SparseCoder.from_config(SAEConfig(architecture="kron", d_in=d_in, d_sae=d_sae, k=k, kron_m=m, kron_n=n))
    opts = {name: make_optimizer(sae, 1e-4) for name, sae in (("topk", topk), ("kron", kron))}

    def step(sae: SparseCoder, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            loss = sae(x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    def topk_encoder() -> object:
        with torch.no_grad():
            return topk.select_active(x, None, train=True)

    def kron_encoder() -> object:
        with torch.no_grad():
            return kron.select_factored(kron.factors(x), None)

    return {"topk encoder": topk_encoder, "kron encoder": kron_encoder,
            "topk step": step(topk, opts["topk"]), "kron step": step(kron, opts["kron"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-sae", default="8192,32768")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--d-in", type=int, default=512)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)  # (B, d_in)
    print(f"KronSAE (m {args.m}, n {args.n}) vs TopK: batch {args.batch}, d_in {args.d_in}, k {args.k}, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'d_sae':>7s} {'encoder FLOPs kron/topk':>24s} {'topk enc ms':>12s} {'kron enc ms':>12s} {'enc ratio':>10s} "
          f"{'topk step ms':>13s} {'kron step ms':>13s} {'step ratio':>11s}")
    for d_sae in (int(v) for v in args.d_sae.split(",")):
        calls = contenders(x, d_sae, args.k, args.m, args.n)
        for call in calls.values():
            call()  # warm-up (and the native build)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                call()
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        heads = d_sae // (args.m * args.n)
        flops = heads * (args.m + args.n) / d_sae
        print(f"{d_sae:7d} {flops:24.3f} {ms['topk encoder']:12.1f} {ms['kron encoder']:12.1f} "
              f"{ms['kron encoder'] / ms['topk encoder']:9.2f}× {ms['topk step']:13.1f} {ms['kron step']:13.1f} "
              f"{ms['kron step'] / ms['topk step']:10.2f}×", flush=True)


if __name__ == "__main__":
    main()
