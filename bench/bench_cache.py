"""`sae-kit cache` throughput against the bare forward of the same model on the same batches, in one run.

The bare forward is `model.capture` (stopped after the deepest hook point, as caching stops it) over the
pre-tokenized batches the cache sees: same batch size, context and hook points, activations left on the device.
The cache is `cache_activations` end to end into a fresh local folder (tokenizing, forward, copy to the host,
hashing, shard writes, manifest commits), with the model already loaded. Goal: cache ≥ 80% of the bare forward.

Also printed: where the cache run's time went by stage (`CacheTimings`: tokenizer busy, forward busy, the forward
thread's waits for tokens and for the writers, the writers' copy waits, serialising, hashing, writing, fsync, the
drain after the last forward), and each host stage of one shard's write timed alone in GB/s (device-to-host copy,
concatenation, safetensors.save, sha256, write + fsync, the old writer path against the uncopied one, and the
uncopied one on every writer thread at once) against the GB/s the bare forward produces rows at.

Usage: python bench/bench_cache.py [--model reference] [--hook H ...] [--context-size 256] [--batch-size 32]
       [--tokens N] [--device cuda] [--threads 2] [--repeats 2]
       python bench/bench_cache.py --make-gpt2 /tmp/gpt2s --context-size 1024   # a GPT-2-small-sized random model
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

from activation_store import store as store_mod  # noqa: E402
from activation_store.capture import to_host, token_batches  # noqa: E402
from activation_store.model import LoadedModel, load_model, reference_model_path  # noqa: E402
from activation_store.storage import Storage, atomic_write  # noqa: E402
from activation_store.store import CacheConfig, CacheTimings, cache_activations, safetensors_parts  # noqa: E402
from activation_store.tokens import DatasetConfig  # noqa: E402


def default_hook(model: LoadedModel) -> str:
    """CacheConfig's default hook point when the model has it, else the output of the model's last block."""
    default = CacheConfig().hook_points[0]
    if default in model.hook_points:
        return default
    names = [h for h in model.list_hook_points() if model.layer_of(h) is not None]
    deepest = max(model.layer_of(h) for h in names)
    return [h for h in names if model.layer_of(h) == deepest][-1]  # a block's own hook fires after its parts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_cache(
    model: str = "reference", hook_points: tuple[str, ...] | None = None, backend: str = "auto",
    context_size: int = 256, batch_size: int = 32, n_tokens: int | None = None, shard_tokens: int = 65_536,
    dtype: str = "float32", device: str | None = None, dataset: str = "stdlib", repeats: int = 2,
    out_dir: str | None = None, loaded: LoadedModel | None = None, host_check: bool = True, copy_ab: bool = True,
) -> dict[str, Any]:
    """Tokens/s of `cache_activations` and of the bare forward on the same batches, and their ratio.

    n_tokens defaults to 8 forward batches on CPU, and on CUDA to 64 batches or 4M tokens, whichever is more. Runs
    alternate and each keeps its best of `repeats` (the first pays one-time costs, and machines are shared).
    `loaded` passes `model` already loaded. "stages" holds the best cache run's `CacheTimings`; "host_gb_s" the host
    stages of one shard's write timed alone (`host_stages`, skipped without `host_check`). On CUDA with `copy_ab`
    each repeat also runs the cache with `store.COPY_STREAM` switched: "other_copy_stream_tok_s", its best.
    """
    m = loaded if loaded is not None else load_model(model, backend=backend, device=device)
    hooks = tuple(hook_points) if hook_points else (default_hook(m),)
    if n_tokens is None:
        per_batch = batch_size * context_size
        n_tokens = max(64 * per_batch, 1 << 22) if m.device.type == "cuda" else 8 * per_batch
    data = DatasetConfig(path=dataset, context_size=context_size)
    cfg = CacheConfig(model=model, backend=m.backend, hook_points=hooks, dataset=data, n_tokens=n_tokens,
                      batch_size=batch_size, shard_tokens=shard_tokens, dtype=dtype, device=str(m.device))

    t = time.perf_counter()
    batches = [b.tokens for b in token_batches(m, data, batch_size, n_tokens)]  # (B, C) each
    tokenize_s = time.perf_counter() - t
    n = sum(b.numel() for b in batches)
    batches = [b.to(m.device) for b in batches]  # the bare forward copies nothing
    m.capture(batches[0], hooks)  # warm-up (kernels, allocator)
    _sync(m.device)

    forward, cache, timings, other = [], [], [], []
    default_copy = store_mod.COPY_STREAM
    root = Path(tempfile.mkdtemp(prefix="bench_cache_", dir=out_dir))

    def run_cache(out: Path, stats: CacheTimings) -> float:
        t = time.perf_counter()
        cache_activations(CacheConfig(**{**cfg.__dict__, "out": str(out)}), progress=False, model=m, timings=stats)
        _sync(m.device)
        seconds = time.perf_counter() - t
        shutil.rmtree(out, ignore_errors=True)
        return seconds

    try:
        for rep in range(repeats):
            t = time.perf_counter()
            for tokens in batches:
                m.capture(tokens, hooks)
            _sync(m.device)
            forward.append(time.perf_counter() - t)
            timings.append(CacheTimings())
            cache.append(run_cache(root / f"store{rep}", timings[-1]))
            if m.device.type == "cuda" and copy_ab:  # A/B: the same run with the copy stream switched
                store_mod.COPY_STREAM = not default_copy
                try:
                    other.append(run_cache(root / f"other{rep}", CacheTimings()))
                finally:
                    store_mod.COPY_STREAM = default_copy
        shard_rows = cfg.batches_per_shard * batch_size * context_size  # rows of a full shard, none excluded
        host = host_stages(shard_rows, m.width(hooks[0]), getattr(torch, dtype), m.device, root) if host_check else {}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    forward_tok_s, cache_tok_s = n / min(forward), n / min(cache)
    best = timings[cache.index(min(cache))]
    row_bytes = sum(m.width(h) for h in hooks) * getattr(torch, dtype).itemsize
    return {
        "cache_tok_s": cache_tok_s, "forward_tok_s": forward_tok_s, "ratio": cache_tok_s / forward_tok_s,
        "tokenize_tok_s": n / tokenize_s, "model": model, "backend": m.backend, "device": str(m.device),
        "stages": best.as_dict(), "host_gb_s": host, "forward_gb_s": forward_tok_s * row_bytes / 1e9,
        "copy_stream": default_copy, "other_copy_stream_tok_s": n / min(other) if other else None,
        "hook_points": list(hooks), "d_in": [m.width(h) for h in hooks], "context_size": context_size,
        "batch_size": batch_size, "n_tokens": n, "shard_tokens": shard_tokens, "dtype": dtype, "dataset": dataset,
        "repeats": repeats, "threads": torch.get_num_threads(),
    }


def host_stages(rows: int, width: int, dtype: torch.dtype, device: torch.device, folder: Path,
                repeats: int = 2) -> dict[str, float]:
    """GB/s of each host stage of writing one shard of (rows, width) activations, each timed alone (best of
    `repeats`): "d2h" (CUDA only: the rows into fresh pinned memory, as the forward thread copies them), "concat",
    "safetensors_save", "sha256", "write_fsync" (write, fsync, rename), "old_path" (the four of them, as the writer
    ran before rows were written uncopied), "new_path" (`safetensors_parts` and `Storage.write_parts_atomic`) and
    "new_path_parallel" (that on all `_WRITERS` writer threads at once, each its own shard: their sum), and
    "new_path_parallel_x2" on twice as many threads (would more writers help?)."""
    gen = torch.Generator().manual_seed(0)
    halves = [torch.randn(rows // 2, width, generator=gen).to(dtype) for _ in range(2)]  # a shard's two batches
    gb = sum(h.numel() for h in halves) * dtype.itemsize / 1e9
    storage = Storage(str(folder / "host_stages"))
    calls = iter(range(1 << 30))

    def best(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def write_fsync(blob: bytes) -> None:
        os.makedirs(storage.root, exist_ok=True)
        atomic_write(storage.path(f"w{next(calls)}"), lambda p: Path(p).write_bytes(blob))

    def old_path() -> None:
        blob = safetensors.torch.save({"activations": torch.cat(halves)})
        write_fsync(blob)
        hashlib.sha256(blob).hexdigest()

    def new_path() -> None:
        storage.write_parts_atomic(f"n{next(calls)}", safetensors_parts("activations", halves))

    acts = torch.cat(halves)
    blob = safetensors.torch.save({"activations": acts})
    seconds = {"concat": best(lambda: torch.cat(halves)),
               "safetensors_save": best(lambda: safetensors.torch.save({"activations": acts})),
               "sha256": best(lambda: hashlib.sha256(blob).hexdigest()), "write_fsync": best(lambda: write_fsync(blob)),
               "old_path": best(old_path), "new_path": best(new_path)}
    for name, writers in (("new_path_parallel", store_mod._WRITERS), ("new_path_parallel_x2", 2 * store_mod._WRITERS)):
        with ThreadPoolExecutor(writers) as pool:  # each thread its own shard, as the writers run
            t = time.perf_counter()
            list(pool.map(lambda _: new_path(), range(writers)))
            seconds[name] = (time.perf_counter() - t) / writers
    if device.type == "cuda":
        on_device = acts.to(device)
        seconds["d2h"] = best(lambda: (to_host(on_device), torch.cuda.synchronize(device)))
    shutil.rmtree(storage.root, ignore_errors=True)
    return {name: gb / s for name, s in seconds.items()}


def stage_lines(r: dict[str, Any]) -> list[str]:
    """`measure_cache`'s stage breakdown and host stages as printable lines."""
    s, n = r["stages"], r["n_tokens"]
    rest = n * (s["batches"] - 1) / max(1, s["batches"])  # about the tokens of the batches after the first
    gb = s["bytes_written"] / 1e9
    rate = lambda sec: f"{gb / sec:.2f} GB/s" if sec > 0 else "-"  # noqa: E731
    lines = [
        f"cache stages (best run, {s['total_s']:.2f} s, {gb:.2f} GB written; the bare forward makes rows at "
        f"{r['forward_gb_s']:.2f} GB/s): setup {s['setup_s']:.2f} s | drain after the last forward "
        f"{s['drain_s']:.2f} s" + (f" | GPU busy {s['gpu_s']:.2f} s (the bare forward: {n / r['forward_tok_s']:.2f} s)"
                                   if s["gpu_s"] else ""),
        f"  forward thread: forward {s['forward_s']:.2f} s | waited for tokens {s['wait_tokens_s']:.2f} s | waited "
        f"for writers {s['wait_writers_s']:.2f} s  ({s['batches']} batches)",
        f"  tokenizer thread: busy {s['tokenize_s']:.2f} s ({rest / s['tokenize_s'] if s['tokenize_s'] else 0:,.0f} "
        f"tok/s while busy, the first batch tokenized in setup; alone {r['tokenize_tok_s']:,.0f} tok/s; TOKENIZERS_PARALLELISM="
        f"{os.environ.get('TOKENIZERS_PARALLELISM', 'unset')})",
        f"  writer threads (seconds summed over {store_mod._WRITERS}): waited for copies {s['wait_copy_s']:.2f} s | "
        f"serialise {s['serialise_s']:.2f} s | sha256 {s['hash_s']:.2f} s ({rate(s['hash_s'])}) | write "
        f"{s['write_s']:.2f} s ({rate(s['write_s'])}) | open+fsync+rename {s['sync_s']:.2f} s ({rate(s['sync_s'])})"
        f" | manifest commits {s['commit_s']:.2f} s",
    ]
    if r["other_copy_stream_tok_s"]:
        where = {True: "on a copy stream of its own", False: "on the forward's stream"}
        lines.append(f"A/B of the device-to-host copy: {where[r['copy_stream']]} (the default) {r['cache_tok_s']:,.0f}"
                     f" tok/s | {where[not r['copy_stream']]} {r['other_copy_stream_tok_s']:,.0f} tok/s")
    if r["host_gb_s"]:
        lines.append("host stages of one shard alone, GB/s: " + " | ".join(
            f"{k} {v:.2f}" for k, v in r["host_gb_s"].items()) + f"  (needed: {r['forward_gb_s']:.2f})")
    return lines


def make_gpt2(path: str, n_layer: int = 12, d_model: int = 768, n_ctx: int = 1024) -> str:
    """Save a randomly initialised GPT-2-small-sized model (the reference model's tokenizer) to `path`."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(reference_model_path()))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=n_ctx, n_embd=d_model, n_layer=n_layer,
                        n_head=d_model // 64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> None:
    """Measure and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference")
    parser.add_argument("--make-gpt2", metavar="DIR", help="save a GPT-2-small-sized random model to DIR and use it "
                        "(hf backend)")
    parser.add_argument("--hook", action="append", dest="hooks", help="hook point (repeat for several)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--context-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=None,
                        help="default: 8 batches on CPU; on CUDA 64 batches or 4M tokens, whichever is more")
    parser.add_argument("--shard-tokens", type=int, default=65_536)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out-dir", default=None, help="where the temporary stores go (default: the system temp)")
    parser.add_argument("--skip-host-stages", action="store_true", help="do not time one shard's host stages alone")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, backend = a.model, a.backend
    if a.make_gpt2:
        model, backend = make_gpt2(a.make_gpt2, n_ctx=max(1024, a.context_size)), "hf"
    r = measure_cache(model, tuple(a.hooks or ()), backend=backend, context_size=a.context_size,
                      batch_size=a.batch_size, n_tokens=a.tokens, shard_tokens=a.shard_tokens, dtype=a.dtype,
                      device=a.device, repeats=a.repeats, out_dir=a.out_dir, host_check=not a.skip_host_stages)
    print(f"model {r['model']} ({r['backend']}, {r['device']}, {r['threads']} threads), hooks {r['hook_points']} "
          f"(d_in {r['d_in']}), context {r['context_size']}, batch {r['batch_size']}, {r['n_tokens']:,} tokens, "
          f"{r['dtype']}, best of {r['repeats']}")
    print(f"bare forward {r['forward_tok_s']:,.0f} tok/s | sae-kit cache {r['cache_tok_s']:,.0f} tok/s | "
          f"tokenizing alone {r['tokenize_tok_s']:,.0f} tok/s")
    print(f"cache / bare forward: {r['ratio']:.2f} (goal ≥ 0.80)")
    print("\n".join(stage_lines(r)))


if __name__ == "__main__":
    main()
