"""TopK SAE training-step throughput: ours (sparse kernels, dense reference) vs sparsify, SAELens and the roofline.

One step = forward + backward + Adam step on the same (batch, d_in) fp32 tensor, no AuxK (nothing is dead yet);
ours uses the optimiser `sae-kit train` builds (fused Adam), the peers torch's default Adam. On a CPU with bf16
matrix units ours takes the encoder product in bf16 and recomputes in fp32 the few latents per row that could
reach the top k (the selection and the values are the fp32 ones); "ours (fp32 encoder)" switches that off.
Contenders run interleaved, round after round, so a noisy shared machine slows them alike; each round starts with
one untimed step per contender; tokens/s is reported from the median step (and the best step).

The roofline is the measured FLOP/s of the dense fp32 encoder matmul (batch × d_in)@(d_in × d_sae) into a reused
output, divided by 2·d_in·d_sae FLOPs per token: the cost of the one dense product an fp32 TopK SAE runs. The
same product in bf16 is printed too: the floor of our bf16 encoder.

Peers are imported lazily: `pip install eai-sparsify==1.3.3 sae-lens==6.54.12` (sae-lens pins transformer-lens<4,
so install them into a separate venv made with --system-site-packages if the project needs transformer-lens 4).
`--archs batchtopk,matryoshka_batchtopk,kron` adds our other TopK-family architectures as contenders (same step, in
train mode) and prints each one's step time against BatchTopK's and TopK's; `--only-archs` skips the peers, the
rooflines and the TopK variants.
Usage: python bench/bench_topk.py [--rounds 4] [--threads 2] [--batch 4096] [--d-in 512] [--d-sae 8192] [--k 32]
                                  [--archs A,B] [--only-archs]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LR = 1e-4


def train_step(loss: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
    """One training step: forward (`loss`), backward, Adam."""
    def step() -> None:
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    return step


def ours(x: torch.Tensor, d_sae: int, k: int, sparse: bool, arch: str = "topk") -> Callable[[], None]:
    """sae-kit's TopKSAE (or another TopK-family architecture), fast path or dense reference."""
    from sae_kit.sae import SAEConfig, SparseCoder
    from sae_kit.train.optim import make_optimizer

    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=x.shape[1], d_sae=d_sae, k=k))
    sae.use_sparse_kernels = sparse
    return train_step(lambda: sae(x).loss, make_optimizer(sae, LR))  # what `sae-kit train` uses (fused Adam)


def sparsify(x: torch.Tensor, d_sae: int, k: int) -> Callable[[], None]:
    """EleutherAI sparsify's SparseCoder (its fused encoder and embedding_bag decoder)."""
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=d_sae, k=k))
    return train_step(lambda: sae(x).fvu, torch.optim.Adam(sae.parameters(), lr=LR))


def saelens(x: torch.Tensor, d_sae: int, k: int) -> Callable[[], None]:
    """SAELens' TopKTrainingSAE with its default config (dense activations)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k, dtype="float32", device="cpu"))
    inp = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
    return train_step(lambda: sae.training_forward_pass(inp).loss, torch.optim.Adam(sae.parameters(), lr=LR))


def preselect_switch(step: Callable[[], None], value: str) -> Callable[[], None]:
    """The same step with SAE_KIT_BF16_PRESELECT set to `value` while it runs (0: the encoder product in fp32; 1: on
    CUDA, the fp32 selection through the tensor cores)."""
    from sae_kit.sae.kernels import BF16_SWITCH

    def run() -> None:
        before = os.environ.get(BF16_SWITCH)
        os.environ[BF16_SWITCH] = value
        try:
            step()
        finally:
            if before is None:
                del os.environ[BF16_SWITCH]
            else:
                os.environ[BF16_SWITCH] = before

    return run


def fp32_encoder(step: Callable[[], None]) -> Callable[[], None]:
    """The same step with the bf16 preselection switched off (the encoder product in fp32)."""
    return preselect_switch(step, "0")


def matmul(x: torch.Tensor, d_sae: int, dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """The roofline's dense encoder product, into a reused output."""
    w = (torch.randn(x.shape[1], d_sae) / x.shape[1] ** 0.5).to(dtype)
    xd = x.to(dtype)
    out = torch.empty(x.shape[0], d_sae, dtype=dtype)
    return lambda: torch.mm(xd, w, out=out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="steps per contender per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=512)
    ap.add_argument("--d-sae", type=int, default=8192)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--archs", default="", help="comma-separated further architectures of ours to time")
    ap.add_argument("--only-archs", action="store_true", help="time TopK and --archs only")
    args = ap.parse_args()
    archs = [a for a in args.archs.split(",") if a]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)  # (B, d_in)
    print(f"TopK step: batch {args.batch}, d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    from sae_kit.sae import kernels, native
    from sae_kit.sae.topk import BF16_MAX_WIDTH_FRACTION

    print(f"our top-k: {'native C (sae_kit/sae/topk_native.c)' if native.library() else 'torch (no native build)'}")
    bf16 = (kernels.bf16_preselect_usable(x, torch.empty(args.d_in, args.d_sae))
            and args.k <= BF16_MAX_WIDTH_FRACTION * args.d_sae)
    print("our encoder: " + ("bf16 product on the CPU's bf16 units, exact fp32 top-k and values by rescoring "
                             "(sae_kit/sae/rescore_native.c)" if bf16 else "fp32 product (no bf16 matrix units)"))

    builders: dict[str, Callable[[], Callable[[], None]]] = {
        "roofline matmul": lambda: matmul(x, args.d_sae),
        "bf16 matmul": lambda: matmul(x, args.d_sae, torch.bfloat16),
        "ours (sparse kernels)": lambda: ours(x, args.d_sae, args.k, sparse=True),
        "ours (fp32 encoder)": lambda: fp32_encoder(ours(x, args.d_sae, args.k, sparse=True)),
        "ours (dense path)": lambda: ours(x, args.d_sae, args.k, sparse=False),
        "sparsify 1.3.3": lambda: sparsify(x, args.d_sae, args.k),
        "sae-lens 6.54.12": lambda: saelens(x, args.d_sae, args.k),
    }
    if args.only_archs:
        builders = {"ours (sparse kernels)": builders["ours (sparse kernels)"]}
    for arch in archs:
        builders[f"ours {arch}"] = lambda arch=arch: ours(x, args.d_sae, args.k, sparse=True, arch=arch)
    steps: dict[str, Callable[[], None]] = {}
    for name, build in builders.items():
        try:
            steps[name] = build()
            steps[name]()  # warm-up
        except ImportError as e:
            print(f"{name:24s} not installed ({e.name})")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            step()  # untimed: the first step after another contender re-faults its freed buffers into memory
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)

    def tok_s(name: str, pick: Callable[[list[float]], float] = statistics.median) -> float:
        return args.batch / pick(times[name])

    print(f"{'contender':24s} {'tokens/s (median)':>18s} {'(best)':>9s} {'ms/step':>8s}")
    for name in steps:
        shown = {"roofline matmul": "roofline (fp32 matmul)", "bf16 matmul": "bf16 matmul"}.get(name, name)
        med = statistics.median(times[name])
        print(f"{shown:24s} {tok_s(name):18,.0f} {tok_s(name, min):9,.0f} {1e3 * med:8.1f}")
    if "roofline matmul" in steps:
        flops = 2 * args.batch * args.d_in * args.d_sae / statistics.median(times["roofline matmul"])
        print(f"matmul: {flops / 1e9:.1f} GFLOP/s → roofline {tok_s('roofline matmul'):,.0f} tokens/s "
              f"(= FLOP/s / (2·d_in·d_sae))")
    comparisons = (("ours (sparse kernels)", "sparsify 1.3.3", "ours/sparsify"),
                   ("ours (sparse kernels)", "sae-lens 6.54.12", "ours/saelens"),
                   ("ours (sparse kernels)", "roofline matmul", "ours/roofline"),
                   ("ours (sparse kernels)", "bf16 matmul", "ours/bf16 matmul"),
                   ("ours (fp32 encoder)", "roofline matmul", "ours fp32 enc/roofline"),
                   ("ours (fp32 encoder)", "sparsify 1.3.3", "ours fp32 enc/sparsify"),
                   ("ours (sparse kernels)", "ours (dense path)", "ours sparse/dense"))
    for arch in archs:
        for base in ("batchtopk", "topk"):
            other = "ours (sparse kernels)" if base == "topk" else f"ours {base}"
            if other in steps and f"ours {arch}" in steps and other != f"ours {arch}":
                ratio = statistics.median(times[f"ours {arch}"]) / statistics.median(times[other])
                best = min(times[f"ours {arch}"]) / min(times[other])
                print(f"{arch} step / {base} step: {ratio:.2f}×  (best steps: {best:.2f}×)")
    for mine, other, label in comparisons:
        if args.only_archs:
            break
        if other in steps:
            print(f"{label:24s} {tok_s(mine) / tok_s(other):6.2f}×  "
                  f"(best steps: {tok_s(mine, min) / tok_s(other, min):.2f}×)")
        else:
            print(f"{label:24s} n/a ({other} not installed)")


if __name__ == "__main__":
    main()
