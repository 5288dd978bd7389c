"""Memory traffic of one training step, counted op by op on any machine, in passes over the weight matrix.

Outside the encoder product an SAE step on a GPU is memory-bound: at 4096 × 131072 every pass over a (d_in, d_sae)
fp32 matrix moves 2.1 GB, about 0.5 ms at the H200's 4.3 TB/s, so the passes a step makes over its weights, their
gradients, Adam's state and activations of the same size are most of what it costs besides the product. This runs
one step of the trainer (`loop._step`, after warm-up steps) and of the sparsify contender that `bench_gpu.py` times,
under a dispatch mode that adds up, for every aten op, the bytes of the dense tensors it reads and writes (in-place
operands count as a read and a write; views nothing; tensors under 1% of the matrix are ignored), in units of one
fp32 (d_in, d_sae) matrix. It is a model of HBM traffic, exact for elementwise ops and Adam: a gather
(`embedding_bag`, `sampled_addmm`) counts its whole weight once, though it may read some rows twice and others not
at all, and a CPU run takes the CPU kernels' paths. The shape is scaled down from a GPU shape by `--scale` in
d_in, d_sae and batch alike, so the passes are those of the full shape.

    python bench/param_traffic.py                  # TopK at 4096 × 131072 / 16, ours against sparsify
    python bench/param_traffic.py --arch all --ops  # every architecture, with the ops behind each total
    python bench/param_traffic.py --device cuda --dtype bfloat16 --ops  # the CUDA path at full size
    python bench/param_traffic.py --exact          # also the exact fp32 selection through a bf16 product
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_gpu import loop_step, sparsify  # noqa: E402

H200_BYTES_PER_S = 4.3e12  # device-to-device copy, read + write, measured (device README's KINDS.md)


@dataclass
class Traffic:
    """Bytes read and written per aten op during one recorded call."""
    unit: int  # bytes of one fp32 (d_in, d_sae) matrix
    read: collections.Counter = field(default_factory=collections.Counter)
    written: collections.Counter = field(default_factory=collections.Counter)
    calls: collections.Counter = field(default_factory=collections.Counter)

    def passes(self, op: str | None = None) -> float:
        """Matrix passes (read + written) of one op, or of all."""
        ops = [op] if op is not None else set(self.read) | set(self.written)
        return sum(self.read[o] + self.written[o] for o in ops) / self.unit


class TrafficCounter(TorchDispatchMode):
    """Adds up the bytes each aten op reads and writes of dense tensors holding at least `min_bytes`."""

    def __init__(self, unit: int, min_bytes: int):
        super().__init__()
        self.traffic = Traffic(unit)
        self.min_bytes = min_bytes

    def _bytes(self, t: object) -> int:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return 0
        n = t.numel() * t.element_size()
        return n if n >= self.min_bytes else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        schema = func._schema.arguments
        written = 0
        read = 0
        for i, a in enumerate(args):
            mutable = i < len(schema) and schema[i].alias_info is not None and schema[i].alias_info.is_write
            for t in tree_flatten(a)[0]:
                b = self._bytes(t)
                read += b
                written += b if mutable else 0
        for name, a in kwargs.items():
            spec = next((s for s in schema if s.name == name), None)
            mutable = spec is not None and spec.alias_info is not None and spec.alias_info.is_write
            for t in tree_flatten(a)[0]:
                b = self._bytes(t)
                # an out= argument is written, not read
                read += 0 if (mutable and name == "out") else b
                written += b if mutable else 0
        if not any(s.alias_info is not None and s.alias_info.is_write for s in schema):
            written += sum(self._bytes(t) for t in tree_flatten(out)[0])
        if read or written:
            name = func._schema.name.removeprefix("aten::")
            self.traffic.read[name] += read
            self.traffic.written[name] += written
            self.traffic.calls[name] += 1
        return out


def step_traffic(step: Callable[[], None], d_in: int, d_sae: int, warmup: int = 2) -> Traffic:
    """Traffic of one call of `step` after `warmup` calls (Adam's state exists, the pattern caches are warm)."""
    for _ in range(warmup):
        step()
    unit = d_in * d_sae * 4
    with TrafficCounter(unit, min_bytes=max(1, unit // 100)) as counter:
        step()
    return counter.traffic


def ours(arch: str, d_in: int, d_sae: int, k: int, batch: int, dtype: str = "float32", device: str = "cpu",
         exact: bool = False) -> Traffic:
    """Traffic of the trainer's step for `arch` on one resident batch; `exact`: the TopK family's fp32 selection
    through a bf16 product (`kernels.bf16_rescored_topk`, CUDA's path under SAE_KIT_BF16_PRESELECT=1)."""
    from sae_kit.sae import SparseCoder

    torch.manual_seed(0)
    x = torch.randn(batch, d_in, device=device)
    extra = {"sparsity_coefficient": 1e-3} if SparseCoder.REGISTRY[arch].uses_sparsity_coefficient else {}
    with tempfile.TemporaryDirectory() as tmp, _rescored_selection(exact):
        step, _ = loop_step(x, d_sae, k, dtype, Path(tmp), architecture=arch, **extra)
        return step_traffic(step, d_in, d_sae)


@contextlib.contextmanager
def _rescored_selection(on: bool) -> Iterator[None]:
    """With `on`, every TopK-family selection takes the CUDA route of an fp32 encoder on any device (on CUDA the
    switch alone would; elsewhere the CPU's own routes are swapped out for the count)."""
    if not on:
        yield
        return
    from sae_kit.sae.kernels import BF16_SWITCH
    from sae_kit.sae.topk import TopKSAE

    before_switch, before_route = os.environ.get(BF16_SWITCH), TopKSAE.row_topk
    os.environ[BF16_SWITCH] = "1"
    TopKSAE.row_topk = TopKSAE._row_topk_rescored
    try:
        yield
    finally:
        TopKSAE.row_topk = before_route
        if before_switch is None:
            del os.environ[BF16_SWITCH]
        else:
            os.environ[BF16_SWITCH] = before_switch


def theirs(d_in: int, d_sae: int, k: int, batch: int, device: str = "cpu") -> Traffic:
    """Traffic of `bench_gpu.py`'s sparsify contender (forward, backward, torch Adam; no decoder maintenance)."""
    torch.manual_seed(0)
    return step_traffic(sparsify(torch.randn(batch, d_in, device=device), d_sae, k), d_in, d_sae)


def report(name: str, t: Traffic, full_unit: int, ops: bool) -> None:
    """One line of totals, and the ops behind them when asked."""
    total = t.passes()
    print(f"  {name:28s} {total:6.1f} passes   {total * full_unit / H200_BYTES_PER_S * 1e3:7.2f} ms at 4.3 TB/s")
    if ops:
        for op in sorted(set(t.read) | set(t.written), key=t.passes, reverse=True):
            print(f"      {t.passes(op):6.2f}  {op} ×{t.calls[op]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096x131072x64", help="the GPU shape d_in x d_sae x k (batch 4096)")
    ap.add_argument("--scale", type=int, default=None, help="divide d_in, d_sae and batch by this (default 16 on "
                    "a CPU, 1 on CUDA, where the op list is the CUDA path's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="topk", help="an architecture, or 'all'")
    ap.add_argument("--dtype", default="float32", help="the trainer's --dtype (bfloat16: the GPU's encoder)")
    ap.add_argument("--ops", action="store_true", help="list the ops behind each total")
    ap.add_argument("--exact", action="store_true", help="also the TopK family's exact fp32 selection through a bf16 "
                    "product (SAE_KIT_BF16_PRESELECT=1 on CUDA)")
    args = ap.parse_args(argv)
    from sae_kit.sae import SparseCoder

    d_in, d_sae, k = (int(v) for v in args.shape.lower().split("x"))
    batch = 4096
    s = args.scale or (1 if args.device.startswith("cuda") else 16)
    small = dict(d_in=d_in // s, d_sae=d_sae // s, k=k, batch=batch // s)
    full_unit = d_in * d_sae * 4
    shipped = sorted(a for a, cls in SparseCoder.REGISTRY.items() if cls.__module__.startswith("sae_kit."))
    archs = shipped if args.arch == "all" else [args.arch]
    print(f"Memory traffic of one step: {d_in} × {d_sae}, k {k}, batch {batch}, counted at 1/{s} of that "
          f"({small['d_in']} × {small['d_sae']}, batch {small['batch']}); a pass = one fp32 (d_in, d_sae) matrix, "
          f"{full_unit / 1e9:.2f} GB at full size")
    for arch in archs:
        report(f"sae-kit {arch} ({args.dtype})", ours(arch, dtype=args.dtype, device=args.device, **small),
               full_unit, args.ops)
        if args.exact and args.dtype == "float32" and SparseCoder.REGISTRY[arch].has_k:
            report(f"sae-kit {arch} (fp32 exact)",
                   ours(arch, dtype=args.dtype, device=args.device, exact=True, **small), full_unit, args.ops)
    try:
        import sparsify as _  # noqa: F401
    except ImportError:
        print("  sparsify: not installed")
    else:
        report("sparsify TopK (contender)", theirs(device=args.device, **small), full_unit, args.ops)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
