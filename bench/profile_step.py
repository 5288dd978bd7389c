"""Where one TopK training step spends its time: phases (select, decode + loss, backward, Adam) timed with device
events, then the kernels that ran, from torch.profiler. Guides the next speed change on a GPU whose minutes are few.

Usage: python bench/profile_step.py [--shape 4096,131072,64] [--batch 4096] [--dtype auto|float32|bfloat16]
                                    [--arch topk|batchtopk|abstopk|...] [--rows 25] [--json OUT.json]
Defaults: the GPU issue's largest shape on CUDA, 256 × 1024, k 8 on CPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

LR = 1e-4


class _Clock:
    """Elapsed milliseconds between marks: CUDA events on a GPU (no sync inside the step), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def phases(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) if self.cuda else 1e3 * (b - a)
        self.marks.clear()
        return out


def build(d_in: int, d_sae: int, k: int, batch: int, dtype: str, device: torch.device,
          arch: str = "topk") -> Callable[[_Clock], None]:
    """One step of a TopK-family SAE in the regime `sae-kit train --dtype` picks, with phase marks."""
    from sae_kit.sae import SAEConfig, SparseCoder
    from sae_kit.sae.base import fvu
    from sae_kit.train.loop import encoder_precision
    from sae_kit.train.optim import make_optimizer

    torch.manual_seed(0)
    x = torch.randn(batch, d_in, device=device)
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k), device=device)
    sae.train()
    opt = make_optimizer(sae, LR)
    precision = encoder_precision(dtype, device)

    def step(clock: _Clock) -> None:
        clock.mark("start")
        with torch.no_grad(), sae.training_precision(precision):
            sel = sae.select_active(x, None, train=True)
        clock.mark("select (encoder product + top-k)")
        with sae.training_precision(precision):
            acts, idx, y_hat, _, _ = sae._decode_sparse_selection(x, sel)
            loss = fvu(x, y_hat)
        clock.mark("gather + sparse decode + loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clock.mark("backward (sparse)")
        opt.step()
        clock.mark("Adam")

    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=None, help="d_in,d_sae,k")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--arch", default="topk", help="a TopK-family architecture (topk, batchtopk, abstopk, ...)")
    ap.add_argument("--rounds", type=int, default=10, help="timed steps")
    ap.add_argument("--rows", type=int, default=25, help="kernels listed")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = "4096,131072,64" if device.type == "cuda" else "256,1024,8"
    d_in, d_sae, k = (int(v) for v in (args.shape or default).split(","))
    step = build(d_in, d_sae, k, args.batch, args.dtype, device, args.arch)
    clock = _Clock(device)
    for _ in range(3):  # warm-up: allocator, cuBLAS handles, lazy module loads
        step(clock)
        clock.phases()
    runs = []
    for _ in range(args.rounds):
        step(clock)
        runs.append(clock.phases())
    phases = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    total = sum(phases.values())
    print(f"{args.arch} {d_in} × {d_sae}, k {k}, batch {args.batch}, {device}, --dtype {args.dtype}, torch {torch.__version__}")
    for name, ms in phases.items():
        print(f"  {name:40s} {ms:9.3f} ms  {100 * ms / total:5.1f}%")
    print(f"  {'step':40s} {total:9.3f} ms  ({args.batch / total * 1e3:,.0f} tokens/s)")

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step(clock)
        clock.phases()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=70)
    print(f"\nKernels over 3 steps, by {sort}:\n{table}")
    busy = None
    if device.type == "cuda":
        # The kernels' own time against the step's: well below it, the GPU waits for the host's launches.
        busy = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) for e in averages
                   if getattr(e, "device_type", None) is not None and "cuda" in str(e.device_type).lower()) / 3e3
        print(f"kernels' device time per step {busy:.3f} ms of a {total:.3f} ms step ({100 * busy / total:.0f}% busy)")
    if args.json:
        peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
        Path(args.json).write_text(json.dumps({"arch": args.arch, "shape": [d_in, d_sae, k], "batch": args.batch, "dtype": args.dtype,
                                               "device": str(device), "phases_ms": phases, "step_ms": total,
                                               "peak_gb": peak, "device_busy_ms": busy, "kernels": table},
                                              indent=1))


if __name__ == "__main__":
    main()
