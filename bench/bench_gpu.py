"""Training speed where users train: the TopK step against sparsify, SAELens and the matmul rooflines; the whole
training loop against its own bare step; caching against the bare forward. Ratios from one run, on any machine.

1. Step: forward + backward + Adam on one (batch, d_in) fp32 tensor, fp32 master weights and Adam state. "ours"
   is the step `sae-kit train` runs in the regime `--dtype auto` picks (bf16 encoder on CUDA, as sparsify's
   autocast; fp32 on CPU); "ours fp32" forces the fp32 encoder; "ours loop step" is the trainer's whole step
   (`loop._step`: also gradient clipping, the decoder-norm fix-ups, dead-latent counters, metrics). Peers when
   installed. ms/step (median), tokens/s, peak memory (CUDA), next to the bf16 and fp32 matmul rooflines (the dense
   encoder product alone). Shapes: the three of the GPU issue on CUDA; small ones on CPU.
   Host time: the same steps (ours, the loop's, sparsify's) at a shape so small that the device's work is negligible,
   so their time is the host's (Python, dispatch, kernel launches), with the aten ops each step issues. A GPU step
   whose kernels take less than this waits on the host.
2. Pipeline: tokens/s of `train()` on in-memory tensors and of `sae-kit train --activations` (an on-disk store),
   each as the marginal rate of two runs of different length (start-up and publishing cancel out), against the
   loop's bare step on batches already on the device. Then the host time per step of `train --activations`' loop
   with its feed (marginal, as above) next to the bare loop step's, at section 1's tiny host shape on the store's
   rows: what the loop and the feed add per step on the host, where a GPU step of a real shape waits on the host.
3. Caching: `sae-kit cache` tokens/s against the bare forward of the same model (bench/bench_cache.py).

Usage: python bench/bench_gpu.py [--quick] [--rounds N] [--threads 2] [--skip-peers] [--skip-step] [--skip-host]
                                 [--skip-pipeline]
                                 [--skip-store] [--skip-cache] [--shapes 0,2] [--contenders ours,sparsify] [--json F]
`--shapes` and `--contenders` pick parts of section 1, so that each shape (or peer) can run in a process of its own
(bench/h200/run.sh does that on the H200); `--json F` appends one JSON object per measurement to F as it is made.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench.bench_topk import preselect_switch, train_step  # noqa: E402
from sae_kit.sae.native import bf16_matmul_units  # noqa: E402

LR = 1e-4
GPU_SHAPES = ((768, 24576, 32), (2304, 65536, 64), (4096, 131072, 64))
CPU_SHAPES = ((256, 1024, 8), (512, 8192, 32))
QUICK_SHAPES = ((64, 256, 4),)
GPU_ROUNDS = 20
"""Timed steps per contender on CUDA (the largest shape's slowest contender, SAELens, takes well under a second)."""
HOST_SHAPE = (64, 256, 4)
"""d_in, d_sae, k of the host-time measurement, at batch HOST_BATCH: a few µs of device work per kernel."""
HOST_BATCH = 256
FEED_THREADS_AB = (1, 4)
"""Section 2 also runs `train --activations` with the feed's gathers on these many CPU threads (feed.FEED_THREADS)."""
CONTENDERS = ("ours", "ours-triton", "ours-bags", "ours-grouped", "ours-new", "ours-fp32", "ours-fp32-exact", "loop",
              "loop-new", "bf16mm", "fp32mm", "sparsify", "saelens")
"""Keys for --contenders, in the order section 1 runs them."""

_json_path: Path | None = None


def record(section: str, **fields: object) -> None:
    """Append one measurement to the --json file (one object a line, written as soon as it is made)."""
    if _json_path is None:
        return
    line = json.dumps({"section": section, **fields, "time": round(time.time(), 1)})
    with open(_json_path, "a") as f:
        f.write(line + "\n")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Callable[[], object], device: torch.device, rounds: int, warmup: int = 2) -> list[float]:
    """Seconds per call, `rounds` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


# -- 1. the step ------------------------------------------------------------------------------------------------

def ours(x: torch.Tensor, d_sae: int, k: int, precision: torch.dtype | None) -> Callable[[], None]:
    """sae-kit's TopK step in a precision regime (None: fp32 encoder)."""
    from sae_kit.sae import SAEConfig, SparseCoder
    from sae_kit.train.optim import make_optimizer

    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=x.shape[1], d_sae=d_sae, k=k), device=x.device)

    def loss() -> torch.Tensor:
        with sae.training_precision(precision):
            return sae(x).loss

    return train_step(loss, make_optimizer(sae, LR))


def triton_on(step: Callable[[], None]) -> Callable[[], None]:
    """The same step with the opt-in Triton kernel for the decoder backward (sae_kit.sae.triton_kernels)."""
    return switched(step, USE_TRITON=True)


def switched(step: Callable[[], None], **flags: bool) -> Callable[[], None]:
    """The same step with `sae_kit.sae.kernels` switches set (USE_TRITON, USE_TRITON_BAGS, ...) while it runs."""
    from sae_kit.sae import kernels, triton_kernels

    if any(flags.get(name) for name in ("USE_TRITON", "USE_TRITON_BAGS", "USE_TRITON_ROWS")) and not triton_kernels.available():
        raise ImportError("Triton is not installed", name="triton")

    def run() -> None:
        before = {name: getattr(kernels, name) for name in flags}
        for name, value in flags.items():
            setattr(kernels, name, value)
        try:
            step()
        finally:
            for name, value in before.items():
                setattr(kernels, name, value)

    return run


def ours_loop_step(x: torch.Tensor, d_sae: int, k: int, dtype: str, tmp: Path) -> Callable[[], None]:
    """The trainer's own step (`loop._step`) on one resident batch."""
    step, _ = loop_step(x, d_sae, k, dtype, tmp)
    return step


def loop_step(x: torch.Tensor, d_sae: int, k: int, dtype: str, tmp: Path, **cfg_kw: object):
    """(step closure, config) of the training loop's step over a TensorSource of x, with everything `train` builds."""
    from sae_kit.train import TensorSource, TrainConfig, loop

    cfg = TrainConfig(hook_points="h", k=k, d_sae=d_sae, batch_size=x.shape[0], n_tokens=x.shape[0] * 10**6,
                      lr=LR, out=str(tmp), dtype=dtype, device=str(x.device), **cfg_kw)
    source = TensorSource({"h": x})
    plan = loop._plan(cfg, source, False, loop.SingleProcess(), x.device)
    trainees, _ = loop._build_trainees(cfg, plan, source)
    for t in trainees:
        if t.log_file is not None:
            t.log_file.close()
            t.log_file = None
    halt = loop._Halt(x.device, len(trainees), cfg.micro_batches)
    batch = {"h": x}
    counter = [0]

    def step() -> None:
        loop._step(trainees, batch, counter[0], cfg, plan, halt)
        counter[0] += 1
        for t in trainees:
            del t.recent[:-loop.FINAL_WINDOW]

    return step, cfg


def sparsify(x: torch.Tensor, d_sae: int, k: int) -> Callable[[], None]:
    """EleutherAI sparsify's SparseCoder (its forward autocasts to bf16 on CUDA)."""
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=d_sae, k=k), device=x.device)
    return train_step(lambda: sae(x).fvu, torch.optim.Adam(sae.parameters(), lr=LR))


def saelens(x: torch.Tensor, d_sae: int, k: int) -> Callable[[], None]:
    """SAELens' TopKTrainingSAE with its default config."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k, dtype="float32",
                                                device=str(x.device)))
    inp = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
    return train_step(lambda: sae.training_forward_pass(inp).loss, torch.optim.Adam(sae.parameters(), lr=LR))


def matmul(x: torch.Tensor, d_sae: int, dtype: torch.dtype) -> Callable[[], None]:
    """The dense encoder product alone, into a reused output."""
    w = (torch.randn(x.shape[1], d_sae, device=x.device) / x.shape[1] ** 0.5).to(dtype)
    xd = x.to(dtype)
    out = torch.empty(x.shape[0], d_sae, dtype=dtype, device=x.device)
    return lambda: torch.mm(xd, w, out=out)


def bench_steps(shapes, batch: int, device: torch.device, rounds: int, peers: bool,
                contenders: tuple[str, ...] = CONTENDERS) -> int:
    """Section 1; returns the number of contenders that failed with an error (not: not installed)."""
    cuda = device.type == "cuda"
    errors = 0
    print(f"\n== 1. TopK step: batch {batch}, forward + backward + Adam, fp32 master weights, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for d_in, d_sae, k in shapes:
        torch.manual_seed(0)
        x = torch.randn(batch, d_in, device=device)
        precision = torch.bfloat16 if cuda else None
        regime = "bf16 encoder" if cuda else "fp32 encoder (CPU: exact bf16 preselection where AMX)"
        with tempfile.TemporaryDirectory() as tmp:
            # key → (name printed, builder)
            builders: dict[str, tuple[str, Callable[[], Callable[[], object]]]] = {
                "ours": (f"ours ({regime})",
                         lambda x=x, d_sae=d_sae, k=k, precision=precision: ours(x, d_sae, k, precision)),
                "ours-triton": ("ours, Triton decoder backward (SAE_KIT_TRITON=1)",
                                lambda x=x, d_sae=d_sae, k=k, precision=precision: triton_on(ours(x, d_sae, k, precision))),
                "ours-bags": ("ours, Triton segment sums (SAE_KIT_TRITON_BAGS=1)",
                              lambda x=x, d_sae=d_sae, k=k, precision=precision: switched(
                                  ours(x, d_sae, k, precision), USE_TRITON_BAGS=True)),
                "ours-grouped": ("ours, grouped top-k (SAE_KIT_GROUPED_TOPK=1)",
                                 lambda x=x, d_sae=d_sae, k=k, precision=precision: switched(
                                     ours(x, d_sae, k, precision), GROUPED_TOPK_CUDA=True)),
                "ours-new": ("ours, both (SAE_KIT_TRITON_BAGS=1 SAE_KIT_GROUPED_TOPK=1)",
                             lambda x=x, d_sae=d_sae, k=k, precision=precision: switched(
                                 ours(x, d_sae, k, precision), USE_TRITON_BAGS=True, GROUPED_TOPK_CUDA=True)),
                "ours-fp32": ("ours fp32 (SAE_KIT_BF16_PRESELECT=0)",
                              lambda x=x, d_sae=d_sae, k=k: preselect_switch(ours(x, d_sae, k, None), "0")),
                "loop": ("ours loop step",
                         lambda x=x, d_sae=d_sae, k=k, tmp=tmp: ours_loop_step(x, d_sae, k, "auto", Path(tmp) / "loop")),
                # the loop's step also keeps the decoder rows at unit norm: the row kernels show here
                "loop-new": ("ours loop step, all three (+ SAE_KIT_TRITON_ROWS=1)",
                             lambda x=x, d_sae=d_sae, k=k, tmp=tmp: switched(
                                 ours_loop_step(x, d_sae, k, "auto", Path(tmp) / "loop-new"), USE_TRITON_BAGS=True,
                                 GROUPED_TOPK_CUDA=True, USE_TRITON_ROWS=True)),
                "bf16mm": ("bf16 matmul", lambda x=x, d_sae=d_sae: matmul(x, d_sae, torch.bfloat16)),
                "fp32mm": ("fp32 matmul", lambda x=x, d_sae=d_sae: matmul(x, d_sae, torch.float32)),
            }
            if not cuda:
                del builders["ours-fp32"]  # the CPU default already is the fp32 regime
                for key in ("ours-triton", "ours-bags", "ours-grouped", "ours-new", "loop-new"):  # CUDA-only
                    del builders[key]
                if not bf16_matmul_units():  # without AMX torch's bf16 matmul is emulated: no roofline, minutes
                    del builders["bf16mm"]
            if peers:
                builders["sparsify"] = ("sparsify", lambda x=x, d_sae=d_sae, k=k: sparsify(x, d_sae, k))
                builders["saelens"] = ("SAELens", lambda x=x, d_sae=d_sae, k=k: saelens(x, d_sae, k))
            if cuda:  # last, so that a section's time cap never costs the peers' figures (on CPU AMX already does it)
                builders["ours-fp32-exact"] = ("ours fp32 exact, tensor cores (BF16_PRESELECT=1)",
                                               lambda x=x, d_sae=d_sae, k=k: preselect_switch(ours(x, d_sae, k, None), "1"))
            builders = {key: b for key, b in builders.items() if key in contenders}
            print(f"\n{d_in} × {d_sae}, k {k}")
            print(f"  {'contender':58s} {'ms/step':>9s} {'tokens/s':>12s} {'peak GB':>8s}")
            rates: dict[str, float] = {}
            where = dict(d_in=d_in, d_sae=d_sae, k=k, batch=batch, device=str(device))
            for key, (name, build) in builders.items():
                # The last contender's SAE and optimiser go before this one is measured (after an out-of-memory they
                # would otherwise stay, inflating this one's peak or running it out of memory too); collected, as
                # peers' modules may hold reference cycles.
                step = None
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    step = build()
                    times = _time(step, device, rounds)
                    t = statistics.median(times)
                except ImportError as err:
                    print(f"  {name:58s} not installed ({err.name})")
                    record("step", **where, contender=key, name=name, status="not installed", error=str(err))
                    continue
                except torch.OutOfMemoryError:
                    print(f"  {name:58s} out of memory")
                    record("step", **where, contender=key, name=name, status="out of memory")
                    continue
                except Exception as err:  # one broken contender must not cost the others their figures
                    errors += 1
                    print(f"  {name:58s} failed: {type(err).__name__}: {err}")
                    record("step", **where, contender=key, name=name, status="error",
                           error=f"{type(err).__name__}: {err}")
                    continue
                finally:
                    step = None  # free this contender's SAE before the next one is built
                peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
                rates[name] = batch / t
                shown = f"{peak:8.1f}" if peak is not None else f"{'n/a':>8s}"
                print(f"  {name:58s} {1e3 * t:9.2f} {batch / t:12,.0f} {shown}")
                record("step", **where, contender=key, name=name, status="ok", ms=1e3 * t, ms_min=1e3 * min(times),
                       tok_s=batch / t, peak_gb=peak, rounds=rounds)
            mine = next((n for n in rates if n.startswith("ours (")), None)  # ours in the training regime, or none
            for other in ("sparsify", "SAELens", "bf16 matmul", "fp32 matmul"):
                if mine is not None and other in rates:
                    print(f"  ours / {other:12s} {rates[mine] / rates[other]:6.2f}×")
            for name in rates:  # the switched variants, against sparsify and against their default in this run
                base = mine if name.startswith("ours, ") else "ours loop step" if name.startswith("ours loop step,") else None
                if base in rates and "sparsify" in rates:
                    print(f"  {name:58s} / sparsify {rates[name] / rates['sparsify']:5.2f}×, "
                          f"/ its default {rates[name] / rates[base]:5.2f}×")
    return errors


class _OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched (after autograd, so the backward's too)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.n += 1
        return func(*args, **(kwargs or {}))


def aten_ops(step: Callable[[], object]) -> int:
    """The aten ops one call of `step` dispatches: each a kernel launch on a GPU (Triton kernels not counted)."""
    with _OpCount() as count:
        step()
    return count.n


def bench_host(device: torch.device, rounds: int, peers: bool, contenders: tuple[str, ...] = CONTENDERS) -> None:
    """Host time per step (module docstring, section 1): µs/step at HOST_SHAPE and the aten ops of one step."""
    d_in, d_sae, k = HOST_SHAPE
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    x = torch.randn(HOST_BATCH, d_in, device=device)
    precision = torch.bfloat16 if cuda else None
    print(f"\nhost time per step: {d_in} × {d_sae}, k {k}, batch {HOST_BATCH} (device work negligible), {device}")
    print(f"  {'contender':58s} {'µs/step':>9s} {'aten ops':>9s} {'µs/op':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        builders: dict[str, tuple[str, Callable[[], Callable[[], object]]]] = {
            "ours": ("ours (SAE step)", lambda: ours(x, d_sae, k, precision)),
            "loop": ("ours loop step", lambda: ours_loop_step(x, d_sae, k, "auto", Path(tmp) / "loop")),
        }
        if cuda:  # Triton's launches cost the host more than aten's (and are not counted as aten ops)
            builders["loop-new"] = ("ours loop step, all three switches", lambda: switched(
                ours_loop_step(x, d_sae, k, "auto", Path(tmp) / "loop-new"), USE_TRITON_BAGS=True,
                GROUPED_TOPK_CUDA=True, USE_TRITON_ROWS=True))
        if peers:
            builders["sparsify"] = ("sparsify", lambda: sparsify(x, d_sae, k))
        got: dict[str, float] = {}
        for key, (name, build) in builders.items():
            if key not in contenders:
                continue
            try:
                step = build()
                t = statistics.median(_time(step, device, rounds, warmup=10))
                ops = aten_ops(step)
            except ImportError as err:
                print(f"  {name:58s} not installed ({err.name})")
                continue
            got[key] = t
            print(f"  {name:58s} {1e6 * t:9.0f} {ops:9d} {1e6 * t / ops:7.1f}")
            record("host", d_in=d_in, d_sae=d_sae, k=k, batch=HOST_BATCH, device=str(device), contender=key,
                   name=name, us=1e6 * t, aten_ops=ops, rounds=rounds)
        for key in ("ours", "loop", "loop-new"):  # sparsify's step here is its SAE's alone, with no trainer's bookkeeping
            if key in got and "sparsify" in got:
                print(f"  {builders[key][0]} / sparsify {got[key] / got['sparsify']:6.2f}× the host time")


# -- 2. the pipeline ----------------------------------------------------------------------------------------------

def _marginal_rate(run: Callable[[int], None], short: int, long: int) -> float:
    """Steps/s of the steady state: (long − short) / (time(long) − time(short)); start-up and publishing cancel.
    An unmeasured short run goes first: the first run in a process pays one-time costs (CUDA context and kernel
    loading, allocator growth, imports) that would otherwise land on the short run alone and inflate the rate (on
    the H200, train() on a TensorSource came out at 6.99 of the bare step)."""
    run(short)
    t0 = time.perf_counter()
    run(short)
    t1 = time.perf_counter()
    run(long)
    t2 = time.perf_counter()
    return (long - short) / max(1e-9, (t2 - t1) - (t1 - t0))


def bench_pipeline(device: torch.device, d_in: int, d_sae: int, k: int, batch: int, rows: int, steps: int,
                   store_model: str | None, store_hook: str, store_tokens: int, rounds: int,
                   backend: str = "auto") -> None:
    from sae_kit.train import TensorSource, TrainConfig, train_all

    print(f"\n== 2. Pipeline: TopK {d_in} × {d_sae}, k {k}, batch {batch}, {device}")
    where = dict(d_in=d_in, d_sae=d_sae, k=k, batch=batch, device=str(device), steps=steps)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        torch.manual_seed(0)
        x = torch.randn(rows, d_in) @ torch.randn(d_in, d_in) / d_in**0.5  # (rows, d_in), on the host like a store
        step, _ = loop_step(x[:batch].to(device), d_sae, k, "auto", tmp / "bare")
        # The fastest of many steps: an upper bound on the bare rate, so the ratios below err low on a noisy machine.
        bare = batch / min(_time(step, device, 3 * rounds))
        print(f"  {'bare loop step (fastest; batches already on the device)':58s} {bare:12,.0f} tokens/s")
        record("pipeline", **where, what="bare step", tok_s=bare)
        runs = [0]

        def run_tensors(n_steps: int) -> None:
            runs[0] += 1
            cfg = TrainConfig(hook_points="h", k=k, d_sae=d_sae, batch_size=batch, n_tokens=n_steps * batch, lr=LR,
                              out=str(tmp / f"t{runs[0]}"), device=str(device), log_every=50)
            train_all(cfg, TensorSource({"h": x}), progress=False)

        tensors = batch * _marginal_rate(run_tensors, max(2, steps // 4), steps)
        print(f"  {'train() on a TensorSource':58s} {tensors:12,.0f} tokens/s  {tensors / bare:5.2f} of the bare step")
        record("pipeline", **where, what="train() on a TensorSource", tok_s=tensors, ratio=tensors / bare, rows=rows)
        if store_model is None:
            return
        from activation_store.store import ActivationStore, CacheConfig, cache_activations
        from activation_store.tokens import DatasetConfig

        store = tmp / "store"
        t0 = time.perf_counter()
        cache_activations(CacheConfig(model=store_model, backend=backend, hook_points=(store_hook,),
                                      n_tokens=store_tokens, out=str(store), dataset=DatasetConfig(context_size=256),
                                      device=str(device)),
                          progress=False)
        cached_s = time.perf_counter() - t0
        print(f"  (cached {store_tokens:,} tokens of {store_model} {store_hook} in {cached_s:.0f} s)")
        d_store = ActivationStore.open(str(store)).d_in(store_hook)
        step, _ = loop_step(torch.randn(batch, d_store, device=device), d_sae, k, "auto", tmp / "bare2")
        bare_store = batch / min(_time(step, device, 3 * rounds))

        def run_store(n_steps: int) -> None:
            runs[0] += 1
            cfg = TrainConfig(activations=str(store), k=k, d_sae=d_sae, batch_size=batch, n_tokens=n_steps * batch,
                              lr=LR, out=str(tmp / f"s{runs[0]}"), device=str(device), log_every=50)
            train_all(cfg, progress=False)

        from_store = batch * _marginal_rate(run_store, max(2, steps // 4), steps)
        print(f"  {'bare loop step at the store width d_in ' + str(d_store):58s} {bare_store:12,.0f} tokens/s")
        print(f"  {'sae-kit train --activations (on-disk store)':58s} {from_store:12,.0f} tokens/s  "
              f"{from_store / bare_store:5.2f} of the bare step")
        record("pipeline", **{**where, "d_in": d_store}, what="bare step at the store width", tok_s=bare_store)
        record("pipeline", **{**where, "d_in": d_store}, what="sae-kit train --activations", tok_s=from_store,
               ratio=from_store / bare_store, store_tokens=store_tokens, store_hook=store_hook, cached_s=cached_s)
        # What the step is fed at: when this is near the bare step's rate, the reader is what holds training back.
        reader = batch * _marginal_rate(lambda n: _read_store(str(store), store_hook, batch, n, device),
                                        max(2, steps // 4), steps)
        print(f"  {'store reader + feed alone (no step)':58s} {reader:12,.0f} tokens/s  "
              f"{reader / bare_store:5.2f} of the bare step")
        record("pipeline", **{**where, "d_in": d_store}, what="store reader alone", tok_s=reader,
               ratio=reader / bare_store)
        # A/B: the feed's gathers on fewer CPU threads (feed.FEED_THREADS), whose pool otherwise spins on every core
        # after each gather, where the training thread launching the kernels needs one.
        from sae_kit.train import feed

        for threads in FEED_THREADS_AB:
            feed.FEED_THREADS = threads
            try:
                got = batch * _marginal_rate(run_store, max(2, steps // 4), steps)
                alone = batch * _marginal_rate(lambda n: _read_store(str(store), store_hook, batch, n, device),
                                               max(2, steps // 4), steps)
            finally:
                feed.FEED_THREADS = None
            what = f"sae-kit train --activations, feed on {threads} thread{'s' if threads > 1 else ''}"
            print(f"  {what:58s} {got:12,.0f} tokens/s  {got / bare_store:5.2f} of the bare step "
                  f"(reader + feed alone {alone / bare_store:.2f})")
            record("pipeline", **{**where, "d_in": d_store}, what=what, tok_s=got, ratio=got / bare_store,
                   reader_ratio=alone / bare_store, feed_threads=threads)
        _pipeline_host(device, str(store), store_hook, d_store, steps, rounds, tmp)


def _pipeline_host(device: torch.device, store: str, hook: str, d_in: int, steps: int, rounds: int,
                   tmp: Path) -> None:
    """Host time per step of `train --activations`' loop with its feed, next to the loop's bare step, at the host
    section's tiny SAE on the store's rows (device work negligible): what the loop and the feed add per step on the
    host beyond `loop._step`, where a GPU step of a real shape waits on the host."""
    from sae_kit.train import TrainConfig, train_all

    _, d_sae, k = HOST_SHAPE
    batch = HOST_BATCH
    torch.manual_seed(0)
    step, _ = loop_step(torch.randn(batch, d_in, device=device), d_sae, k, "auto", tmp / "host-bare")
    bare = statistics.median(_time(step, device, max(rounds, steps), warmup=10))
    runs = [0]

    def run_store(n_steps: int) -> None:
        runs[0] += 1
        cfg = TrainConfig(activations=store, k=k, d_sae=d_sae, batch_size=batch, n_tokens=n_steps * batch, lr=LR,
                          out=str(tmp / f"host-s{runs[0]}"), device=str(device), log_every=50)
        train_all(cfg, progress=False)

    short = max(2, steps // 4)
    loop_s = 1 / _marginal_rate(run_store, short, steps)
    reader_s = 1 / _marginal_rate(lambda n: _read_store(store, hook, batch, n, device), short, steps)
    print(f"  host time per step at {d_in} × {d_sae}, k {k}, batch {batch} (device work negligible):")
    print(f"    {'bare loop step (loop._step)':56s} {1e6 * bare:9.0f} µs")
    print(f"    {'sae-kit train --activations loop, with its feed':56s} {1e6 * loop_s:9.0f} µs  "
          f"(+{1e6 * (loop_s - bare):,.0f} µs, {bare / loop_s:.2f} of the bare step)")
    print(f"    {'store reader + feed alone (per batch, no step)':56s} {1e6 * reader_s:9.0f} µs")
    record("pipeline_host", d_in=d_in, d_sae=d_sae, k=k, batch=batch, device=str(device), steps=steps,
           bare_us=1e6 * bare, loop_us=1e6 * loop_s, reader_us=1e6 * reader_s, ratio=bare / loop_s)


def _read_store(store: str, hook: str, batch: int, n_batches: int, device: torch.device) -> None:
    """The first n_batches batches of the store as `train --activations` reads them (shuffled, recycled host
    tensors, the feed's copy to the device), with no step."""
    from activation_store.store import ActivationStore
    from sae_kit.train.feed import training_feed

    source = ActivationStore.open(store)
    epochs = -(-n_batches * batch // source.n_rows) + 1
    with training_feed(source, [hook], batch, device, shuffle=True, seed=0, epochs=epochs) as feed:
        for i, _ in enumerate(feed, start=1):
            if i == n_batches:
                break
    _sync(device)


def gpt2_small_like(folder: Path, n_layer: int = 12, d_model: int = 768) -> str:
    """A randomly initialised model of GPT-2 small's shape (12 layers, d 768, context 1024), with the reference
    tokenizer; `n_layer` and `d_model` shrink it for a CPU dry run of the GPU path."""
    from bench.bench_cache import make_gpt2

    return make_gpt2(str(folder), n_layer=n_layer, d_model=d_model)


# -- 3. caching ---------------------------------------------------------------------------------------------------

def bench_cache(model: str, tokens: int, device: torch.device, backend: str = "auto", context_size: int = 256) -> None:
    print(f"\n== 3. Caching: {model}, {device}")
    try:
        from bench.bench_cache import host_stages, measure_cache, stage_lines
    except ImportError as err:
        print(f"  n/a ({err})")
        return
    got = measure_cache(model=model, backend=backend, context_size=context_size, n_tokens=tokens, device=str(device),
                        host_check=False)
    print(f"  sae-kit cache {got['cache_tok_s']:,.0f} tokens/s, bare forward {got['forward_tok_s']:,.0f} tokens/s: "
          f"{got['ratio']:.2f} of the forward (context {context_size}, batch {got['batch_size']}, "
          f"{got['n_tokens']:,} tokens, hook {got['hook_points'][0]})")
    print("\n".join(f"  {line}" for line in stage_lines(got)))
    record("cache", **got)
    # then, recorded apart (a cut-off here loses nothing above): one shard's host stages alone, in GB/s
    rows = max(1, got["shard_tokens"] // (got["batch_size"] * context_size)) * got["batch_size"] * context_size
    with tempfile.TemporaryDirectory() as folder:
        gb_s = host_stages(rows, got["d_in"][0], getattr(torch, got["dtype"]), device, Path(folder))
    print(f"  host stages of one shard alone ({rows:,} rows x {got['d_in'][0]}), GB/s: "
          + " | ".join(f"{k} {v:.2f}" for k, v in gb_s.items()) + f"  (needed: {got['forward_gb_s']:.2f})")
    record("cache_host", rows=rows, d_in=got["d_in"][0], needed_gb_s=got["forward_gb_s"], **gb_s)


def _shapes(spec: str | None, default: tuple[tuple[int, int, int], ...]) -> tuple[tuple[int, int, int], ...]:
    """--shapes: indices into the default shapes ("0,2") or explicit d_in x d_sae x k ("768x24576x32")."""
    if not spec:
        return default
    return tuple(tuple(int(v) for v in item.split("x")) if "x" in item else default[int(item)]
                 for item in spec.split(","))


def main(argv: list[str] | None = None) -> int:
    global _json_path
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few steps (the test suite's smoke check)")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"timed steps per contender (default {GPU_ROUNDS} on CUDA, 5 on CPU, 2 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--shapes", default=None, help="section 1's shapes: indices into the default list (\"0,2\") "
                    "or d_in x d_sae x k (\"768x24576x32\"), comma-separated")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"section 1's contenders, comma-separated, of {','.join(CONTENDERS)}")
    ap.add_argument("--skip-peers", action="store_true", help="do not try sparsify / SAELens")
    ap.add_argument("--skip-step", action="store_true", help="skip the step comparison (section 1)")
    ap.add_argument("--skip-host", action="store_true", help="skip section 1's host time per step (also skipped with --skip-step)")
    ap.add_argument("--skip-pipeline", action="store_true", help="skip section 2 (train() and train --activations)")
    ap.add_argument("--skip-store", action="store_true", help="skip `train --activations` (no store is cached)")
    ap.add_argument("--skip-cache", action="store_true", help="skip the caching measurement (section 3)")
    ap.add_argument("--model", choices=("auto", "gpt2s", "reference"), default="auto",
                    help="model of the store and of caching: auto = a GPT-2-small-sized random model (hf backend) "
                    "on CUDA, the reference model elsewhere; gpt2s with --quick is a 2-layer one (a CPU dry run of "
                    "the GPU path)")
    ap.add_argument("--pipe-steps", type=int, default=None, help="section 2's long run, in steps (the short: 1/4)")
    ap.add_argument("--store-tokens", type=int, default=None, help="tokens cached for train --activations")
    ap.add_argument("--cache-tokens", type=int, default=None, help="tokens of section 3")
    ap.add_argument("--json", default=None, help="append one JSON object per measurement to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _json_path = Path(args.json) if args.json else None
    warnings.filterwarnings("ignore")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if args.quick:
        shapes, batch, rounds = QUICK_SHAPES, 256, 2
        pipe = dict(d_in=64, d_sae=256, k=4, batch=256, rows=8192, steps=12, store_tokens=4096)
        cache_tokens, cache_context = 4096, 256
    elif cuda:
        shapes, batch, rounds = GPU_SHAPES, args.batch, GPU_ROUNDS
        # 300 steps against 75: the marginal 225 steps (0.9M tokens) last seconds even at the bare step's rate
        pipe = dict(d_in=768, d_sae=24576, k=32, batch=args.batch, rows=1_200_000, steps=300, store_tokens=1_000_000)
        cache_tokens, cache_context = 1_000_000, 1024  # the figure: context 1024, batch 32, 1M tokens
    else:
        shapes, batch, rounds = CPU_SHAPES, args.batch, 5
        pipe = dict(d_in=256, d_sae=1024, k=8, batch=args.batch, rows=400_000, steps=120, store_tokens=400_000)
        cache_tokens, cache_context = 131_072, 256  # 16 batches of 32 × 256 tokens (a few minutes)
    rounds = args.rounds or rounds
    pipe["steps"] = args.pipe_steps or pipe["steps"]
    pipe["store_tokens"] = args.store_tokens or pipe["store_tokens"]
    cache_tokens = args.cache_tokens or cache_tokens
    which = args.model if args.model != "auto" else "gpt2s" if cuda and not args.quick else "reference"
    contenders = tuple(c.strip() for c in args.contenders.split(",") if c.strip())
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        ap.error(f"unknown contenders {sorted(unknown)}; valid: {','.join(CONTENDERS)}")
    info = dict(device=str(device), torch=torch.__version__, cuda=torch.version.cuda, threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name(device) if cuda else None, quick=args.quick, argv=argv or sys.argv[1:])
    record("run", **info)
    errors = 0
    if not args.skip_step:
        errors += bench_steps(_shapes(args.shapes, shapes), batch, device, rounds, peers=not args.skip_peers,
                              contenders=contenders)
    if not args.skip_step and not args.skip_host and {"ours", "loop", "sparsify"} & set(contenders):
        bench_host(device, 20 if args.quick else 200, peers=not args.skip_peers, contenders=contenders)
    if args.skip_pipeline and args.skip_cache:
        return 1 if errors else 0
    with tempfile.TemporaryDirectory() as tmp:
        if which == "gpt2s":  # GPT-2 small's shape as in the issue (tiny under --quick), plain forward hooks
            n_layer, d_model = (2, 64) if args.quick else (12, 768)
            model, backend = gpt2_small_like(Path(tmp) / "gpt2s", n_layer, d_model), "hf"
            hook = f"transformer.h.{min(8, n_layer - 1)}"
        else:  # on CPU the reference model: a store in minutes
            model, backend, hook = "reference", "auto", "blocks.2.hook_resid_post"
        if not args.skip_pipeline:
            bench_pipeline(device, pipe["d_in"], pipe["d_sae"], pipe["k"], pipe["batch"], pipe["rows"], pipe["steps"],
                           None if args.skip_store else model, hook, pipe["store_tokens"], rounds, backend=backend)
        if not args.skip_cache:
            bench_cache(model, cache_tokens, device, backend=backend,
                        context_size=cache_context if which == "gpt2s" else 256)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
