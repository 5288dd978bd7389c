"""The on-disk activation store: write once with `cache_activations`, read shuffled batches with `ActivationStore`.

Layout of a store folder (any fsspec URL: local path, memory://, s3://, gs://):

    manifest.json                          config, model/tokenizer/dataset provenance, shard list, norm stats
    <hook point>/shard_00000.safetensors   {"activations": (rows, d_in)} in the stored dtype
    tokens/shard_00000.safetensors         {"tokens", "doc_ids", "positions"}: (rows,) int64, same row order

Every shard holds the rows of a whole number of forward batches (contexts × positions, minus BOS/EOS/pad rows
when `exclude_special`), identical across hook points. Shards are written first (atomically on local disks),
then the manifest is rewritten to list them: the manifest is the commit point, so a killed run resumes after
its last listed shard, skipping the tokens already stored without running the model over them, and ends with
exactly the shards (same sha256) of an uninterrupted run. `"complete": true` in the manifest marks a finished
store.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import mmap
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch
from torch import Tensor

from activation_store.buffers import BatchBuffers
from activation_store.capture import check_finite, kept_indices, n_contexts, select_rows, to_host, token_batches
from activation_store.model import REFERENCE_NAME, LoadedModel, load_model, resolve_model_name
from activation_store.shuffle import mixed_batches
from activation_store.stages import Stages
from activation_store.storage import Storage, Written, file_sha256, head_and_tail, is_disk_full, sha256, temporary_name
from activation_store.tokens import DatasetConfig, TokenBatch, describe_source

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TOKENS_DIR = "tokens"
FORMAT = "sae-kit-activations"
VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")
SHARD_FILE = r"shard_\d{5,}\.safetensors"
"""Regex of the names `_shard_name` gives."""

# Config fields that do not change what is stored, so a resume may differ in them.
_NOT_CONTENT = ("out", "device")


@dataclass(frozen=True)
class CacheConfig:
    """What `sae-kit cache` captures and where it writes it."""

    model: str = REFERENCE_NAME
    """Hub name, local folder, or "reference" (the embedded model)."""
    backend: str = "auto"
    """Hook-name backend: "auto", "transformer_lens" or "hf"."""
    hook_points: tuple[str, ...] = ("blocks.2.hook_resid_post",)
    """Hook points captured in one forward pass; each gets its own folder."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Token source and context size."""
    n_tokens: int = 1_000_000
    """Tokens run through the model (rounded up to whole contexts); special-token rows are then dropped."""
    batch_size: int = 32
    """Contexts per forward pass."""
    shard_tokens: int = 65_536
    """Target tokens per shard, rounded down to whole forward batches (at least one)."""
    dtype: str = "float32"
    """Stored dtype: "float32", "bfloat16" or "float16" (the model always runs in float32)."""
    out: str = "activations"
    """Output folder or fsspec URL (memory://, s3://, gs://)."""
    exclude_special: bool = True
    """Drop rows of BOS/EOS/pad tokens, whose activations are outliers."""
    device: str | None = None
    """Torch device for the model; None picks CUDA when present."""
    seed: int = 0
    """Recorded for provenance; capture itself is deterministic (eval mode, fixed token order)."""

    def __post_init__(self) -> None:
        if isinstance(self.hook_points, str) or not self.hook_points:
            raise ValueError(f"hook_points must be a non-empty tuple of names, got {self.hook_points!r}")
        object.__setattr__(self, "hook_points", tuple(self.hook_points))
        if len(set(self.hook_points)) != len(self.hook_points):
            raise ValueError(f"hook_points has duplicates: {list(self.hook_points)}")
        if any(h == TOKENS_DIR or "/" in h for h in self.hook_points):
            raise ValueError(f"hook point names may not be {TOKENS_DIR!r} or contain '/': {list(self.hook_points)}")
        for name in ("n_tokens", "batch_size", "shard_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.backend not in ("auto", "transformer_lens", "hf"):
            raise ValueError(f"backend must be 'auto', 'transformer_lens' or 'hf', got {self.backend!r}")
        if not isinstance(self.dataset, DatasetConfig):
            raise ValueError(f"dataset must be a DatasetConfig, got {type(self.dataset).__name__}")

    @property
    def batches_per_shard(self) -> int:
        """Forward batches stored in each shard (all but the last shard are full)."""
        return max(1, self.shard_tokens // (self.batch_size * self.dataset.context_size))

    def content_dict(self) -> dict[str, Any]:
        """The fields that determine the stored content (compared on resume)."""
        d = dataclasses.asdict(self)
        d["hook_points"] = list(self.hook_points)
        for name in _NOT_CONTENT:
            d.pop(name)
        return d


class NormStats(NamedTuple):
    """Normalisation statistics of one hook point over all stored rows."""

    mean: Tensor  # (d,) per-dimension mean
    mean_sq_norm: float  # E‖x‖²


class TokenRows(NamedTuple):
    """Where every stored row came from, in store row order."""

    tokens: Tensor  # (n_rows,) int64 token id
    doc_ids: Tensor  # (n_rows,) int64 document index in the dataset's order
    positions: Tensor  # (n_rows,) int64 position inside the document


@dataclass
class CacheTimings:
    """Where a `cache_activations` run spent its time, stage by stage: filled in when passed to it.

    Wall seconds: `total_s`, `setup_s` (folder checks, fingerprints, the first batch's tokens), `drain_s` (from the
    last forward until the last shard is committed). Busy seconds of one thread: `tokenize_s` (encode, pack and
    prepare batches), `forward_s` (the forward thread's own work; on CUDA mostly kernel launches, as the GPU runs
    behind it), `commit_s` (manifest writes). Waits of the forward thread: `wait_tokens_s` (no batch ready: the
    tokenizer is behind) and `wait_writers_s` (every in-flight slot taken: the writers are behind, or on CUDA the
    GPU's work and copies still under way). Seconds summed over the writer threads: `wait_copy_s` (until the
    device-to-host copy of the shard completed), `serialise_s`, `hash_s`, `write_s` (file writes, page cache) and
    `sync_s` (open, fsync, rename); `commit_s` is the manifest writes alone. On CUDA `gpu_s` is the device's own
    time over every batch's forward and copy (from events): against the bare forward's time it says how long the
    GPU sat idle.
    """

    total_s: float = 0.0
    setup_s: float = 0.0
    tokenize_s: float = 0.0
    forward_s: float = 0.0
    wait_tokens_s: float = 0.0
    wait_writers_s: float = 0.0
    wait_copy_s: float = 0.0
    serialise_s: float = 0.0
    hash_s: float = 0.0
    write_s: float = 0.0
    sync_s: float = 0.0
    commit_s: float = 0.0
    drain_s: float = 0.0
    gpu_s: float = 0.0
    bytes_written: int = 0
    batches: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **seconds: float) -> None:
        """Add to fields from any thread."""
        with self._lock:
            for name, value in seconds.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain dict (for JSON records)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}


# -- writing --------------------------------------------------------------------------------------------------


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _model_fingerprint(model: LoadedModel) -> dict[str, Any]:
    return model_fingerprint(model.name)


def model_fingerprint(name: str) -> dict[str, Any]:
    """Cheap identity of local model weights: config hash plus size and head/tail hash of each weight file."""
    path = Path(resolve_model_name(name))
    if not path.is_dir():
        return {"hub_name": name}
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode() + head_and_tail(f, size))
    return {"weights_fingerprint": h.hexdigest()}


def _tokenizer_info(model: LoadedModel) -> dict[str, Any]:
    tok = model.tokenizer
    info: dict[str, Any] = {"name_or_path": model.name, "vocab_size": len(tok)}
    path = Path(resolve_model_name(model.name)) / "tokenizer.json"
    if path.exists():
        info["tokenizer_json_sha256"] = file_sha256(path)
    elif getattr(tok, "backend_tokenizer", None) is not None:
        info["tokenizer_json_sha256"] = sha256(tok.backend_tokenizer.to_str().encode())
    return info


def _header(cfg: CacheConfig, model: LoadedModel, dataset: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": cfg.content_dict(),
        "model": {"name": cfg.model, "backend": model.backend, **_model_fingerprint(model)},
        "tokenizer": _tokenizer_info(model),
        "dataset": dataset,
        "context_size": cfg.dataset.context_size,
        "dtype": cfg.dtype,
        "exclude_special": cfg.exclude_special,
        "hook_points": {h: {"d_in": model.width(h), "folder": h} for h in cfg.hook_points},
        "batches_per_shard": cfg.batches_per_shard,
        "n_contexts_planned": n_contexts(cfg.n_tokens, cfg.dataset.context_size),
    }


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r}, requested {b!r}")
    return out


def _comparable(content: dict[str, Any]) -> dict[str, Any]:
    """Stored content fields as compared on resume: unshuffled, the shuffle buffer is moot, and caches written before
    shuffling existed hold neither field."""
    dataset = content.get("dataset")
    if isinstance(dataset, dict) and dataset.get("shuffle_seed") is None:
        dataset = {k: v for k, v in dataset.items() if k not in ("shuffle_seed", "shuffle_buffer")}
        content = {**content, "dataset": dataset}
    return content


def _unfingerprinted_note(manifest: dict[str, Any]) -> str:
    """A note for stores of local files started before their fingerprints were recorded: their files cannot be
    checked, so a resume is refused rather than risking rows of two datasets in one store."""
    dataset = manifest.get("dataset")
    if isinstance(dataset, dict) and "files" in dataset and "file_fingerprints" not in dataset:
        return (" (the store was started before sae-kit recorded a fingerprint of each data file, so an unchanged "
                "file cannot be told from an edited one)")
    return ""


def _kill_point(point: str, shard: int) -> None:
    """Seam for the crash tests, called where a kill must lose nothing: "mid_shard" (one file of the shard written),
    "before_manifest" (all its files written, not yet listed), "after_shard" (listed). Does nothing."""


def _check_folder(storage: Storage, cfg: CacheConfig) -> dict[str, Any] | None:
    """The manifest if the folder holds a sae-kit store; None if it is new or empty; ValueError if it holds anything
    else. Nothing is changed here: a folder that is not a store is refused as it is."""
    if storage.exists(MANIFEST):
        try:
            manifest = storage.read_json(MANIFEST)
        except ValueError:  # not JSON
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{cfg.out}/{MANIFEST} is not a sae-kit activation manifest; choose an empty or new "
                             "folder")
        return manifest
    if storage.exists() and not storage.fs.isdir(storage.root):
        raise ValueError(f"output {cfg.out!r} is a file, not a folder")
    ours = set(cfg.hook_points) | {TOKENS_DIR}  # empty folders with the store's own names may stay
    found = [n for n in storage.listdir() if n not in ours or storage.listdir(n)]
    if found:
        hint = ""
        if all(temporary_name(re.escape(MANIFEST)).fullmatch(n) for n in found):
            hint = f" ({found[0]} is what a `sae-kit cache` killed before its first commit leaves: delete it)"
        raise ValueError(
            f"output folder {cfg.out!r} is not empty and holds no {MANIFEST} (found {found[:5]}); "
            f"choose an empty or new folder{hint}"
        )
    return None


def _remove_temporaries(storage: Storage, cfg: CacheConfig) -> None:
    """Delete what a killed writer of this store left: temporaries of its manifest and shard files, matched by the
    exact names `atomic_write` gives them, in the store's own folders only. Call once the manifest is known ours."""
    removed = storage.remove_temporaries("", re.escape(MANIFEST))
    for folder in (*cfg.hook_points, TOKENS_DIR):
        removed += [f"{folder}/{name}" for name in storage.remove_temporaries(folder, SHARD_FILE)]
    if removed:
        log.info("removed %d temporary file(s) of a killed run from %s", len(removed), cfg.out)


def _verify_listed(storage: Storage, manifest: dict[str, Any], check_hash: bool) -> None:
    for shard in manifest["shards"]:
        for entry in shard["files"].values():
            if not storage.exists(entry["path"]):
                raise ValueError(f"shard file {entry['path']!r} listed in {storage.url}/{MANIFEST} is missing")
            size = storage.size(entry["path"])
            if size != entry["bytes"]:
                raise ValueError(
                    f"shard file {entry['path']!r} in {storage.url} has {size} bytes, manifest says {entry['bytes']}"
                    " (truncated or overwritten)"
                )
            if check_hash and sha256(storage.read_bytes(entry["path"])) != entry["sha256"]:
                raise ValueError(f"shard file {entry['path']!r} in {storage.url} fails its sha256 check (corrupted)")


_READY_TOKENS = 1 << 20
"""Tokens prepared ahead of the forward: enough for the tokenizer's next chunk of documents to be encoded while
the forward works through them (a chunk arrives in one burst, several batches at once)."""
_WRITERS = max(2, min(4, os.cpu_count() or 1))
"""Threads that serialise, hash and write shard files, one file per job (hook points write in parallel)."""
_IN_FLIGHT = _WRITERS + 1
"""Shards handed to the writers and not yet committed; bounds the host memory held."""


class _Ready(NamedTuple):
    """A token batch prepared for the forward."""

    tokens: Tensor  # (B, C) int64 token ids, pinned when the model is on CUDA
    keep: Tensor | None  # (R,) flat indices of the kept tokens (None: all), pinned like tokens
    where: tuple[Tensor, Tensor, Tensor]  # (R,) token id, document index, position of each kept row


def _prepare(batch: TokenBatch, tokenizer: Any, exclude_special: bool, pin: bool) -> _Ready:
    keep = kept_indices(batch.tokens, tokenizer, exclude_special)
    where = (select_rows(batch.tokens, keep), select_rows(batch.doc_ids, keep), select_rows(batch.positions, keep))
    if pin:  # pinned memory lets the forward copy them to the device without waiting
        return _Ready(batch.tokens.pin_memory(), None if keep is None else keep.pin_memory(), where)
    return _Ready(batch.tokens, keep, where)


class _Rows(NamedTuple):
    """One hook point's kept rows of one batch, in host memory once the shard's copy event completed."""

    acts: Tensor  # (R, d) stored dtype
    sum: Tensor  # (d,) float64 Σx over the rows as stored
    sum_sq: Tensor  # () float64 Σ‖x‖²


COPY_STREAM = False
"""On CUDA, copy rows to the host on a stream of their own (the next forward need not wait for the copy) rather than
on the forward's stream. Off until a GPU run shows it pays: bench/bench_cache.py times the cache both ways."""


def _forward(model: LoadedModel, cfg: CacheConfig, item: _Ready, copy_stream: Any = None) -> dict[str, _Rows]:
    """One forward; every hook point's kept rows in the stored dtype and their sums (computed where the rows are:
    on a GPU they cost nothing), on their way to host memory: copied on `copy_stream` when given (CUDA), after it
    waited for the forward's stream, else on the forward's stream."""
    tokens = item.tokens.to(model.device, non_blocking=True)
    dtype = getattr(torch, cfg.dtype)
    on_device = {}
    for h, a in model.capture(tokens, cfg.hook_points).items():  # (B, C, d) on the model's device
        rows = select_rows(a, item.keep).to(dtype)  # (R, d)
        x = rows.double()  # statistics over the values as stored, in float64
        on_device[h] = (rows, x.sum(0), (x * x).sum())
    if copy_stream is None:
        return {h: _Rows(*(to_host(t) for t in ts)) for h, ts in on_device.items()}
    copy_stream.wait_stream(torch.cuda.current_stream(model.device))
    with torch.cuda.stream(copy_stream):
        out = {h: _Rows(*(to_host(t) for t in ts)) for h, ts in on_device.items()}
    for ts in on_device.values():
        for t in ts:  # made on the forward's stream: their memory is not reused before the copy read it
            t.record_stream(copy_stream)
    return out


_Sums = tuple[list[float], float]  # Σx per dimension, Σ‖x‖²


def _sums(parts: list[_Rows], hook_point: str, index: int) -> _Sums:
    """A shard's sums from its batches'; ValueError naming the batch if any value is NaN or inf (a non-finite value
    makes its batch's sums non-finite)."""
    total, total_sq = torch.zeros_like(parts[0].sum), 0.0
    for j, part in enumerate(parts):
        sq = float(part.sum_sq)
        if not (torch.isfinite(part.sum).all() and math.isfinite(sq)):
            check_finite({hook_point: part.acts}, f"shard {index}, batch {j} of that shard")
        total += part.sum
        total_sq += sq
    return total.tolist(), total_sq


class _Shard:
    """One shard: rows as the forward hands them over, then its files as they are written."""

    def __init__(self, index: int, hook_points: Sequence[str]):
        self.index, self.name = index, _shard_name(index)
        self.acts: dict[str, list[_Rows]] = {h: [] for h in hook_points}  # hook → per batch
        self.where: list[tuple[Tensor, Tensor, Tensor]] = []  # per batch: (r,) token id, document, position
        self.contexts = 0
        self.batches = 0
        self.copied: Any = None  # on CUDA an event that completes once every block is in host memory
        self.files: dict[str, Future[tuple[dict[str, Any], _Sums | None]]] = {}
        self.written: list[str] = []  # files on disk, removed again if the shard is never committed

    @property
    def rows(self) -> int:
        return sum(len(w[0]) for w in self.where)

    def add(self, acts: dict[str, _Rows], item: _Ready) -> None:
        for h, a in acts.items():
            self.acts[h].append(a)
        self.where.append(item.where)
        self.contexts += len(item.tokens)
        self.batches += 1


class _ShardWriter:
    """Runs the cache as overlapping stages, and commits shards strictly in order: files first, manifest last.

    tokens (thread) → forward and device-to-host copy (calling thread) → file writes (pool of `_WRITERS`, each
    file serialised, hashed and written atomically) → manifest commits (thread). Bounded queues keep each stage
    at most a few batches or shards ahead of the next. After an error the shards handed over before it are still
    committed; the files of the others are removed.
    """

    def __init__(self, storage: Storage, manifest: dict[str, Any], cfg: CacheConfig, timings: CacheTimings):
        self.storage, self.manifest, self.cfg, self.timings = storage, manifest, cfg, timings
        self.pending: dict[int, _Shard] = {}  # handed to the writers, not yet committed

    def run(self, model: LoadedModel, batches: Iterator[TokenBatch], bar: Any) -> None:
        """Cache every batch; return once all shards are committed, or raise the first error of any stage."""
        cfg, cuda = self.cfg, model.device.type == "cuda"
        stages = Stages("sae-kit-cache")
        ready: queue.Queue[_Ready | None] = queue.Queue(
            max(2, _READY_TOKENS // (cfg.batch_size * cfg.dataset.context_size)))
        handed: queue.Queue[_Shard | None] = queue.Queue()  # index order; bounded by the slots
        slots = threading.Semaphore(_IN_FLIGHT)
        pool = ThreadPoolExecutor(_WRITERS, thread_name_prefix="sae-kit-cache-write")

        clock = time.perf_counter
        t = self.timings

        def tokenize() -> None:
            t0 = clock()
            for batch in batches:
                item = _prepare(batch, model.tokenizer, cfg.exclude_special, cuda)
                t1 = clock()
                stages.put(ready, item)
                t0, busy = clock(), t1 - t0
                t.add(tokenize_s=busy)
            stages.put(ready, None)

        def commit() -> None:
            while (shard := stages.get(handed, drain=True)) is not None:
                self.commit(shard)
                slots.release()

        def hand_over(shard: _Shard) -> None:
            t0 = clock()
            stages.acquire(slots)
            t.add(wait_writers_s=clock() - t0)
            if cuda:
                shard.copied = (copy_stream if copy_stream is not None else torch.cuda.current_stream(model.device)).record_event()
            self.pending[shard.index] = shard
            for i, key in enumerate((*cfg.hook_points, TOKENS_DIR)):
                shard.files[key] = pool.submit(self.write_file, shard, key, i == 0)
            handed.put(shard)

        stages.start("tokens", tokenize)
        stages.start("commit", commit)
        events: list[tuple[Any, Any]] = []  # on CUDA: (start, end) of each batch's forward (and copy, on its stream)
        copy_stream = torch.cuda.Stream(model.device) if cuda and COPY_STREAM else None
        try:
            shard = _Shard(len(self.manifest["shards"]), cfg.hook_points)
            while True:
                t0 = clock()
                item = stages.get(ready)
                t1 = clock()
                if item is None:
                    break
                if cuda:  # the GPU's own time for this batch, read once the run is over
                    events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                    events[-1][0].record()
                shard.add(_forward(model, cfg, item, copy_stream), item)
                if cuda:
                    events[-1][1].record()
                t.add(wait_tokens_s=t1 - t0, forward_s=clock() - t1, batches=1)
                bar.update(item.tokens.numel())
                if shard.batches == cfg.batches_per_shard:
                    hand_over(shard)
                    shard = _Shard(shard.index + 1, cfg.hook_points)
            if shard.batches:
                hand_over(shard)
            handed.put(None)
        except BaseException as err:  # noqa: BLE001 (raised by `wait` below, after the other stages stopped)
            stages.fail(err)
        t0 = clock()
        try:
            stages.wait()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            self.discard_uncommitted()
            raise
        pool.shutdown()
        t.add(drain_s=clock() - t0)
        for start, end in events:
            end.synchronize()
            t.add(gpu_s=start.elapsed_time(end) / 1000)

    def write_file(self, shard: _Shard, key: str, first: bool) -> tuple[dict[str, Any], _Sums | None]:
        """Serialise, hash and atomically write one file of a shard; its manifest entry and norm sums."""
        t0 = time.perf_counter()
        if shard.copied is not None:
            shard.copied.synchronize()
        t1 = time.perf_counter()
        sums = None
        if key == TOKENS_DIR:
            tok, doc, pos = (torch.cat(p).long() for p in zip(*shard.where))  # (R,) each
            blob = [safetensors.torch.save({"tokens": tok, "doc_ids": doc, "positions": pos})]
        else:
            parts, shard.acts[key] = shard.acts[key], []  # freed once written
            sums = _sums(parts, key, shard.index)
            blob = safetensors_parts("activations", [p.acts for p in parts])  # (R, d) stored dtype, uncopied
            del parts
        rel = f"{key}/{shard.name}"
        t2 = time.perf_counter()
        done: Written = self.storage.write_parts_atomic(rel, blob)
        self.timings.add(wait_copy_s=t1 - t0, serialise_s=t2 - t1, hash_s=done.hash_s, write_s=done.write_s,
                         sync_s=done.total_s - done.hash_s - done.write_s, bytes_written=done.bytes)
        shard.written.append(rel)
        if first:
            _kill_point("mid_shard", shard.index)
        return {"path": rel, "sha256": done.sha256, "bytes": done.bytes}, sums

    def commit(self, shard: _Shard) -> None:
        """List a shard in the manifest once all its files are written."""
        index, files, sums = shard.index, {}, {}
        for key, future in shard.files.items():
            try:
                files[key], s = future.result()
            except OSError as err:
                if is_disk_full(err):
                    raise OSError(
                        err.errno,
                        f"disk full while writing shard {index} to {self.cfg.out!r}: that shard was discarded, the "
                        f"{index} finished shard(s) are kept; free some space and re-run the same command to resume",
                    ) from err
                raise
            if s is not None:
                sums[key] = s
        _kill_point("before_manifest", index)
        m, rows = self.manifest, shard.rows
        for h, (s, sq) in sums.items():
            acc = m["norm_sums"].setdefault(h, {"sum": [0.0] * len(s), "sum_sq_norm": 0.0, "count": 0})
            acc["sum"] = [p + q for p, q in zip(acc["sum"], s)]
            acc["sum_sq_norm"] += sq
            acc["count"] += rows
        m["shards"].append({"name": shard.name, "contexts": shard.contexts, "batches": shard.batches, "rows": rows,
                            "files": files})
        m["n_rows"] = sum(s["rows"] for s in m["shards"])
        m["n_contexts"] = sum(s["contexts"] for s in m["shards"])
        t0 = time.perf_counter()
        self.storage.write_json_atomic(MANIFEST, m)
        self.timings.add(commit_s=time.perf_counter() - t0)
        del self.pending[index]
        _kill_point("after_shard", index)

    def discard_uncommitted(self) -> None:
        """Remove the files of shards written but never listed (after an error; the next run would overwrite them)."""
        for shard in self.pending.values():
            for rel in shard.written:
                try:
                    self.storage.fs.rm(self.storage.path(rel))
                except OSError:
                    pass


def cache_activations(
    cfg: CacheConfig, progress: bool = True, model: LoadedModel | None = None, timings: CacheTimings | None = None,
) -> str:
    """Run the model over the token stream and write every hook point's activations to cfg.out; resumable.

    `model` may pass in cfg.model already loaded (a pipeline or test reusing it); otherwise it is loaded here.
    `timings`, when given, is filled in with where the time went (bench/bench_cache.py prints it).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    timings = CacheTimings() if timings is None else timings

    storage = Storage(cfg.out)
    existing = _check_folder(storage, cfg)  # before anything is written or removed
    if existing is not None:
        diff = _differences(_comparable(existing["config"]), _comparable(cfg.content_dict()))
        if diff:
            raise ValueError(
                f"output folder {cfg.out!r} holds a different run; differing fields: {'; '.join(diff)}. "
                "Use another --out, or the stored settings to resume"
            )
        if existing.get("complete"):
            log.info("%s is already complete (%d rows in %d shards); nothing to do",
                     cfg.out, existing["n_rows"], len(existing["shards"]))
            return cfg.out

    dataset = describe_source(cfg.dataset)  # a missing data file is named before a slow model load
    if model is None:
        model = load_model(cfg.model, backend=cfg.backend, device=cfg.device)
    elif model.name != cfg.model or (cfg.backend != "auto" and model.backend != cfg.backend):
        raise ValueError(f"the model passed in is {model.name!r} ({model.backend} backend), but the config asks "
                         f"for {cfg.model!r} ({cfg.backend} backend)")
    for h in cfg.hook_points:
        model.validate_hook_point(h)
    model.check_context_size(cfg.dataset.context_size)
    header = _header(cfg, model, dataset)
    if existing is not None:
        diff = _differences({k: existing.get(k) for k in ("model", "tokenizer", "dataset", "hook_points")},
                            {k: header[k] for k in ("model", "tokenizer", "dataset", "hook_points")})
        if diff:
            raise ValueError(f"cannot resume {cfg.out!r}: the model or data changed since it was started: "
                             f"{'; '.join(diff)}{_unfingerprinted_note(existing)}. Use a new --out")
        _remove_temporaries(storage, cfg)
        _verify_listed(storage, existing, check_hash=False)
        manifest = existing
        log.info("resuming %s after %d finished shard(s)", cfg.out, len(manifest["shards"]))
    else:
        manifest = {**header, "shards": [], "norm_sums": {}, "n_rows": 0, "n_contexts": 0, "complete": False}

    skip = len(manifest["shards"]) * cfg.batches_per_shard
    stream = token_batches(model, cfg.dataset, cfg.batch_size, cfg.n_tokens, skip_batches=skip)
    first = next(stream, None)  # surfaces dataset errors (missing text column, ...) before anything is written
    if existing is None:
        if first is None:
            raise ValueError(f"dataset {cfg.dataset.path!r} produced no complete context of "
                             f"{cfg.dataset.context_size} tokens")
        storage.write_json_atomic(MANIFEST, manifest)  # records the config so a mismatch is caught from the start

    C = cfg.dataset.context_size
    total = header["n_contexts_planned"] * C
    bar = tqdm(total=total, initial=manifest["n_contexts"] * C, unit="tok", unit_scale=True,
               desc=f"cache {len(cfg.hook_points)} hook(s)", disable=not progress)
    timings.add(setup_s=time.perf_counter() - start)
    try:
        if first is not None:
            _ShardWriter(storage, manifest, cfg, timings).run(model, _chain(first, stream), bar)
    finally:
        bar.close()
    if manifest["n_contexts"] < header["n_contexts_planned"]:
        log.warning("the dataset ran out after %d of %d contexts", manifest["n_contexts"],
                    header["n_contexts_planned"])
    manifest["norm_stats"] = {
        h: {"mean": [v / s["count"] for v in s["sum"]], "mean_sq_norm": s["sum_sq_norm"] / s["count"]}
        for h, s in manifest["norm_sums"].items() if s["count"]
    }
    manifest["complete"] = True
    storage.write_json_atomic(MANIFEST, manifest)
    timings.add(total_s=time.perf_counter() - start)
    return cfg.out


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


def safetensors_parts(name: str, tensors: Sequence[Tensor]) -> list[Any]:
    """The bytes of `safetensors.torch.save({name: torch.cat(tensors)})` without making them: the header, then
    each tensor's own memory (viewed through numpy, nothing copied). Joined, the parts are that file byte for byte;
    the copies that saving makes (the concatenation, numpy's `tobytes`, the serialiser's buffer) cost more than
    hashing and writing the rows, and two of them hold the GIL."""
    if sys.byteorder != "little":  # safetensors stores little-endian; it byte-swaps
        return [safetensors.torch.save({name: torch.cat(list(tensors)).contiguous()})]
    shape = [sum(len(t) for t in tensors), *tensors[0].shape[1:]]
    dtype = tensors[0].dtype
    n_bytes = math.prod(shape) * dtype.itemsize
    entry = {name: {"dtype": _SAFETENSORS_CODES[dtype], "shape": shape, "data_offsets": [0, n_bytes]}}
    header = json.dumps(entry, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    views = [t.contiguous().view(-1).view(torch.uint8).numpy() for t in tensors if t.numel()]  # (bytes,) each
    return [len(header).to_bytes(8, "little") + header, *views]


def tensors_in(blob: bytearray | mmap.mmap) -> dict[str, Tensor]:
    """The tensors of a safetensors file's bytes, as views of the buffer (no copy).

    safetensors' own `load` copies every tensor out of the bytes it is given: for a store's shards that copy (and
    faulting in its fresh memory) cost more than reading and checksumming the file. Anything this reader does not
    recognise goes to safetensors, which also gives the errors for a malformed file.
    """
    if sys.byteorder != "little":  # safetensors stores little-endian; it byte-swaps
        return safetensors.torch.load(bytes(blob))
    view = memoryview(blob)
    try:
        n = int.from_bytes(view[:8], "little")
        header = json.loads(bytes(view[8:8 + n]))
        start, out = 8 + n, {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
            begin, end = (start + int(o) for o in info["data_offsets"])
            if not start <= begin <= end <= len(blob) or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(name)
            out[name] = (torch.frombuffer(view[begin:end], dtype=dtype) if end > begin
                         else torch.empty(0, dtype=dtype)).view(shape)
    except (ValueError, KeyError, TypeError, AttributeError):
        return safetensors.torch.load(bytes(blob))
    return out


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


# -- reading --------------------------------------------------------------------------------------------------


class ActivationStore:
    """Read side of a finished store: provenance, normalisation stats and shuffled row-aligned batches.

    With `verify` (the default) file sizes are checked at open, and each shard's sha256 the first time it is read
    (again whenever the file has changed since: another inode, size or mtime; on every read for remote stores).
    """

    def __init__(self, storage: Storage, manifest: dict[str, Any], verify: bool):
        self.storage, self.manifest, self.verify = storage, manifest, verify
        # Identities of the local files whose content passed its checksum: later epochs re-read them without
        # hashing again (the hash is most of a shard read's work).
        self._verified: set[tuple[str, tuple[int, int, int, int]]] = set()
        self.hook_points: list[str] = list(manifest["hook_points"])
        self.n_rows: int = int(manifest["n_rows"])
        self._entries = {f["path"]: f for shard in manifest["shards"] for f in shard["files"].values()}

    @classmethod
    def open(cls, path: str, verify: bool = True) -> ActivationStore:
        """Open a finished store; FileNotFoundError when there is none, ValueError when incomplete or damaged."""
        storage = Storage(path)
        if not storage.exists(MANIFEST):
            raise FileNotFoundError(f"no {MANIFEST} in {path!r}: not an activation store (make one with `sae-kit cache`)")
        manifest = storage.read_json(MANIFEST)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path}/{MANIFEST} is not a sae-kit activation manifest")
        if manifest.get("version", 0) > VERSION:
            raise ValueError(f"{path} was written by a newer sae-kit (format version {manifest['version']})")
        if not manifest.get("complete"):
            raise ValueError(
                f"activation store {path!r} is incomplete ({manifest['n_contexts']} of "
                f"{manifest['n_contexts_planned']} contexts); re-run the same `sae-kit cache` command to finish it"
            )
        if verify:
            _verify_listed(storage, manifest, check_hash=False)
        return cls(storage, manifest, verify)

    @property
    def model(self) -> str:
        """Model the activations came from."""
        return self.manifest["model"]["name"]

    def _hook(self, hook_point: str) -> str:
        if hook_point not in self.manifest["hook_points"]:
            raise ValueError(f"store {self.storage.url!r} has no hook point {hook_point!r}; it holds {self.hook_points}")
        return hook_point

    def d_in(self, hook_point: str) -> int:
        """Activation width at a stored hook point."""
        return int(self.manifest["hook_points"][self._hook(hook_point)]["d_in"])

    def stored_dtype(self, hook_point: str) -> torch.dtype:
        """The dtype rows are stored in at a hook point."""
        self._hook(hook_point)
        return getattr(torch, self.manifest["dtype"])

    def norm_stats(self, hook_point: str) -> NormStats:
        """Per-dimension mean and E‖x‖² over all stored rows (computed in float64 while caching)."""
        s = self.manifest["norm_stats"][self._hook(hook_point)]
        return NormStats(torch.tensor(s["mean"], dtype=torch.float64).float(), float(s["mean_sq_norm"]))

    def check(self, model: str | None = None, hook_point: str | None = None, d_in: int | None = None) -> None:
        """Raise ValueError naming the mismatch between this store and what a consumer expects."""
        if model is not None and model != self.model:
            same = False
            try:
                same = Path(resolve_model_name(model)).resolve() == Path(resolve_model_name(self.model)).resolve()
            except FileNotFoundError:
                pass
            if not same:
                raise ValueError(f"store {self.storage.url!r} holds activations of model {self.model!r}, "
                                 f"not {model!r}")
        if hook_point is not None:
            self._hook(hook_point)
        if d_in is not None:
            widths = {h: self.d_in(h) for h in ([hook_point] if hook_point else self.hook_points)}
            if d_in not in widths.values():
                raise ValueError(f"store {self.storage.url!r} has d_in {widths}, not {d_in}")

    def _read(self, rel: str) -> dict[str, Tensor]:
        blob, identity = self.storage.read_buffer(rel)
        if self.verify and (identity is None or (rel, identity) not in self._verified):
            entry = self._entries[rel]
            if len(blob) != entry["bytes"] or sha256(blob) != entry["sha256"]:
                raise ValueError(f"shard {rel!r} of {self.storage.url!r} fails its sha256 check (corrupted or "
                                 "truncated); re-create the store")
            if identity is not None:
                self._verified.add((rel, identity))
        return tensors_in(blob)

    def load_shard(self, index: int, hook_points: Sequence[str]) -> dict[str, Tensor]:
        """All rows of one shard: {hook point: (rows, d)} in the stored dtype."""
        files = self.manifest["shards"][index]["files"]
        return {h: self._read(files[self._hook(h)]["path"])["activations"] for h in hook_points}

    def batches(
        self, hook_points: Sequence[str], batch_size: int, shuffle: bool = True, seed: int = 0, epochs: int = 1,
        start_batch: int = 0, dtype: torch.dtype = torch.float32, buffer_rows: int | None = None,
        prefetch: int = 4, workers: int | None = None, buffers: BatchBuffers | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Row-aligned batches {hook_point: (batch_size, d)}; deterministic given seed, and start_batch skips
        ahead so a resumed trainer sees exactly the batches an uninterrupted run would have seen next.

        Memory is bounded by `buffer_rows` (default: four of the largest shards) plus `prefetch` shards, read ahead
        on `workers` threads (default: one per core, at most 4). Neither changes which batches come out. With
        `buffers`, batches are gathered into the tensors the consumer handed back there.
        """
        if isinstance(hook_points, str):
            hook_points = [hook_points]
        hooks = [self._hook(h) for h in hook_points]
        rows = [int(s["rows"]) for s in self.manifest["shards"]]
        if buffer_rows is None:
            buffer_rows = 4 * max(rows)
        if buffer_rows <= 0:
            raise ValueError(f"buffer_rows must be positive, got {buffer_rows}")
        if workers is None:
            workers = min(4, os.cpu_count() or 1)
        return mixed_batches(rows, lambda i: self.load_shard(i, hooks), batch_size, shuffle=shuffle, seed=seed,
                             epochs=epochs, start_batch=start_batch, buffer_rows=buffer_rows, dtype=dtype,
                             prefetch=prefetch, workers=workers, buffers=buffers)

    def row_tokens(self) -> TokenRows:
        """Token id, document index and position of every stored row, in store row order."""
        parts = [self._read(s["files"][TOKENS_DIR]["path"]) for s in self.manifest["shards"]]
        return TokenRows(*(torch.cat([p[k] for p in parts]) for k in ("tokens", "doc_ids", "positions")))

    def verify_all(self) -> None:
        """Check every shard's sha256 now (reading normally checks each shard as it is used)."""
        _verify_listed(self.storage, self.manifest, check_hash=True)
