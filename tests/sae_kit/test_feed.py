"""The batch feed: the same batches as a synchronous read, errors in place, kills that lose nothing, no host syncs."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest
import torch

from activation_store.shuffle import mixed_batches
from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.train import TensorSource, TrainConfig, train
from sae_kit.train.checkpoint import latest_checkpoint
from sae_kit.train.feed import BatchFeed

HOOK = "h"


def _shards(n_shards: int = 7, rows: int = 300, d: int = 8) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{HOOK: torch.randn(rows + 17 * i, d, generator=gen), "y": torch.randn(rows + 17 * i, 3, generator=gen)}
            for i in range(n_shards)]


def _read(shards, prefetch: int, workers: int, **kw):
    return mixed_batches([len(s[HOOK]) for s in shards], lambda i: shards[i], prefetch=prefetch, workers=workers, **kw)


def _assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for h in x:
            assert x[h].dtype == y[h].dtype and torch.equal(x[h], y[h])


@pytest.mark.parametrize("start_batch", [0, 5, 13])  # 13: inside the second epoch
def test_feed_yields_the_synchronous_readers_batches(start_batch):
    """Order, rows and dtype are those of an in-line read, across the epoch boundary and when starting mid-stream."""
    shards = _shards()
    kw = dict(batch_size=128, epochs=2, seed=3, buffer_rows=900, start_batch=start_batch, dtype=torch.bfloat16)
    synchronous = list(_read(shards, prefetch=0, workers=1, **kw))
    with BatchFeed(_read(shards, prefetch=4, workers=3, **kw), "cpu", depth=2) as feed:
        fed = list(feed)
    _assert_same(fed, synchronous)
    per_epoch = sum(len(s[HOOK]) for s in shards) // 128
    assert len(synchronous) >= 2 * per_epoch - 1 - start_batch  # the second epoch is really there


@pytest.mark.parametrize("start_batch", [0, 13])
def test_a_feed_recycling_batches_yields_the_same_and_never_refills_the_batch_in_use(start_batch):
    """With buffers, a CPU feed hands a batch back only when the next is asked for: the batch the consumer holds
    stays intact however far the feed thread runs ahead, and every batch is the in-line read's."""
    import time

    from activation_store.buffers import BatchBuffers

    shards = _shards()
    kw = dict(batch_size=128, epochs=2, seed=3, buffer_rows=900, start_batch=start_batch)
    synchronous = list(_read(shards, prefetch=0, workers=1, **kw))
    pool = BatchBuffers()
    seen = set()
    with BatchFeed(_read(shards, prefetch=4, workers=3, buffers=pool, **kw), "cpu", depth=2, buffers=pool) as feed:
        for i, batch in enumerate(feed):
            time.sleep(0.01)  # the feed thread fills its queue meanwhile
            _assert_same([batch], [synchronous[i]])
            seen.add(batch[HOOK].data_ptr())
    assert i == len(synchronous) - 1
    assert len(seen) <= 2 + 2  # the queue's depth, the batch in use and the one being made: not one per batch
    assert len(synchronous) > 8


def test_training_gathers_into_recycled_buffers_and_a_source_without_them_still_trains(tmp_path, monkeypatch):
    """`train` hands the feed a BatchBuffers the source gathers into; a source whose `batches` takes no such argument
    (one a user wrote) is called as before and trains to the same weights."""
    import activation_store.buffers as buffers

    x = torch.randn(2048, 16)
    made: list[torch.Tensor] = []  # every tensor handed out, kept alive so that ids stay distinct
    real_take = buffers.BatchBuffers.take
    monkeypatch.setattr(buffers.BatchBuffers, "take", lambda self, *a: made.append(real_take(self, *a)) or made[-1])
    cfg = TrainConfig(hook_points=HOOK, k=4, d_sae=64, batch_size=128, n_tokens=128 * 24, out=str(tmp_path / "a"),
                      log_every=100)
    a = SparseCoder.load(train(cfg, TensorSource({HOOK: x}), progress=False))
    assert len(made) >= 24  # every batch gathered into a pool tensor...
    # ...of a few, refilled: the feed's depth, the one in use, the next, and one the thread may be filling as
    # the loop stops and closes the feed (its queue is then dropped, not handed back)
    assert len({id(t) for t in made}) <= 6

    class Plain:  # only the documented source interface: no `buffers`, no **kwargs
        def __init__(self, inner):
            self.inner = inner
            self.hook_points, self.n_rows, self.model = inner.hook_points, inner.n_rows, inner.model
            self.d_in, self.norm_stats = inner.d_in, inner.norm_stats

        def batches(self, hook_points, batch_size, shuffle=True, seed=0, epochs=1, start_batch=0):
            return self.inner.batches(hook_points, batch_size, shuffle=shuffle, seed=seed, epochs=epochs,
                                      start_batch=start_batch)

    made.clear()
    b = SparseCoder.load(train(cfg.replace(out=str(tmp_path / "b")), Plain(TensorSource({HOOK: x})), progress=False))
    assert made == []  # no buffers asked for
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name


def test_tensor_source_batches_unchanged_by_the_per_epoch_permutation():
    """One permutation per epoch gives the batches the per-batch permutation gave (the resume contract)."""
    x = torch.randn(1000, 4)
    src = TensorSource({HOOK: x})
    got = list(src.batches([HOOK], 96, seed=2, epochs=3, start_batch=4))
    per_epoch = 1000 // 96
    expected = []
    for index in range(4, per_epoch * 3):
        epoch, within = divmod(index, per_epoch)
        order = torch.randperm(1000, generator=torch.Generator().manual_seed(2 * 100_003 + epoch))
        expected.append({HOOK: x[order[within * 96:(within + 1) * 96]]})
    _assert_same(got, expected)


def test_source_errors_surface_in_place():
    """A KeyboardInterrupt raised after 5 batches reaches the consumer after exactly those 5 batches."""
    def source():
        for i in range(100):
            if i == 5:
                raise KeyboardInterrupt
            yield {HOOK: torch.full((2, 2), float(i))}

    seen = []
    with pytest.raises(KeyboardInterrupt):
        for batch in BatchFeed(source(), "cpu", depth=3):
            seen.append(int(batch[HOOK][0, 0]))
    assert seen == [0, 1, 2, 3, 4]


def test_closing_early_stops_the_thread_and_closes_the_source():
    closed = threading.Event()

    def source():
        try:
            for _ in range(10_000):
                yield {HOOK: torch.zeros(1)}
        finally:
            closed.set()

    feed = BatchFeed(source(), "cpu", depth=2)
    next(feed)
    feed.close()
    assert closed.wait(5) and not feed._thread.is_alive()
    with pytest.raises(StopIteration):
        next(feed)


class _CudaStandIns:
    """CPU stand-ins for the CUDA calls of the feed's CUDA branch, logging (thread, call) in order."""

    def __init__(self, monkeypatch):
        self.log: list[tuple[str, ...]] = []
        log, real_to = self.log, torch.Tensor.to

        def note(*what):
            log.append((threading.current_thread().name, *what))

        class Event:
            def __init__(self, stream):
                self.stream = stream

            def synchronize(self):
                note("event_sync", self.stream.name)

        class Stream:
            def __init__(self, device=None, name="side"):
                self.name = name

            def record_event(self):
                note("record_event", self.name)
                return Event(self)

            def synchronize(self):
                note("stream_sync", self.name)

        @contextmanager
        def stream(s):
            note("enter", s.name)
            yield
            note("exit", s.name)

        main = Stream(name="main")

        def pin_memory(t):
            note("pin")
            out = t.clone()
            out.pinned = True
            return out

        def to(t, *args, **kwargs):
            if any(isinstance(a, torch.device) and a.type == "cuda" for a in args):
                note("copy", getattr(t, "pinned", False), kwargs.get("non_blocking", False))
                return t.clone()  # the "device" copy
            return real_to(t, *args, **kwargs)

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: note("record_stream", s.name))
        real_put = BatchFeed._put
        monkeypatch.setattr(BatchFeed, "_put", lambda feed, item: note("put", item[0]) or real_put(feed, item))


def test_cuda_branch_copies_pinned_batches_and_waits_on_an_event(monkeypatch):
    """The CUDA branch, with the CUDA API stood in by loggers: the feed thread pins each tensor, copies it without
    blocking inside its side stream, and waits on an event recorded behind the copies (never `stream.synchronize`,
    which torch's process-wide sync debug mode flags from any thread) before queueing the batch; the training
    thread marks every tensor as used by its own stream before the step gets it."""
    fake = _CudaStandIns(monkeypatch)
    shards = [{HOOK: torch.randn(4, 3), "y": torch.randn(4, 2)} for _ in range(5)]
    got = list(BatchFeed(iter(shards), "cuda", depth=2))
    _assert_same(got, shards)
    feeder = [e[1:] for e in fake.log if e[0] == "sae-kit-batch-feed"]
    per_batch = [("pin",), ("copy", True, True)] * 2 + [("record_event", "side"), ("event_sync", "side"),
                                                        ("put", "batch")]
    assert feeder == [("enter", "side"), *per_batch * 5, ("exit", "side"), ("put", "end")]
    trainer = [e[1:] for e in fake.log if e[0] != "sae-kit-batch-feed"]
    assert trainer == [("record_stream", "main")] * 10


def test_cuda_branch_hands_host_batches_back_once_their_copy_has_finished(monkeypatch):
    """With buffers, the feed thread hands each batch's host tensors back right after the event behind their copies
    (never before: the copy reads them), and the training thread hands back nothing."""
    from activation_store.buffers import BatchBuffers, gather_rows

    fake = _CudaStandIns(monkeypatch)
    pool = BatchBuffers()
    real_give = BatchBuffers.give
    given: list[int] = []

    def give(self, tensors):
        tensors = list(tensors)
        given.extend(id(t) for t in tensors)
        fake.log.append((threading.current_thread().name, "give", len(tensors)))
        real_give(self, tensors)

    monkeypatch.setattr(BatchBuffers, "give", give)
    shards = [{HOOK: torch.randn(4, 3), "y": torch.randn(4, 2)} for _ in range(5)]

    def source():
        for s in shards:
            yield {h: gather_rows(a, slice(0, 4), torch.float32, pool) for h, a in s.items()}

    got = list(BatchFeed(source(), "cuda", depth=2, buffers=pool))
    _assert_same(got, shards)
    feeder = [e[1:] for e in fake.log if e[0] == "sae-kit-batch-feed"]
    per_batch = [("pin",), ("copy", True, True)] * 2 + [("record_event", "side"), ("event_sync", "side"),
                                                        ("give", 2), ("put", "batch")]
    assert feeder == [("enter", "side"), *per_batch * 5, ("exit", "side"), ("put", "end")]
    assert all(e[1] != "give" for e in fake.log if e[0] != "sae-kit-batch-feed")
    assert len(set(given)) <= 4  # the host tensors were reused, not one pair per batch


# -- kills: nothing is lost ---------------------------------------------------------------------------------------

DRIVER = r"""
import os, signal, sys
point, args = sys.argv[1], sys.argv[2:]
import sae_kit.train.loop as loop
from activation_store.store import ActivationStore

if point == "after_checkpoint":  # the seam right after a periodic checkpoint is committed
    loop.after_checkpoint = lambda step, path: os.kill(os.getpid(), signal.SIGKILL) if step == 6 else None
else:  # "prefetch:N": the N-th shard read, made on a background thread ahead of the step
    n, calls, original = int(point.split(":")[1]), [0], ActivationStore.load_shard
    def load_shard(self, index, hooks):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, index, hooks)
    ActivationStore.load_shard = load_shard
from sae_kit.cli import main
sys.exit(main(args))
"""


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tiny_gpt2_path):
    from sae_kit.cli import main

    acts = tmp_path_factory.mktemp("feed") / "acts"
    assert main(["cache", "--model", str(tiny_gpt2_path), "--hook", "blocks.1.hook_resid_post", "--tokens", "4096",
                 "--context-size", "32", "--shard-tokens", "512", "--out", str(acts)]) == 0
    return acts


@pytest.mark.parametrize("point", ["prefetch:11", "after_checkpoint"])
def test_sigkill_during_prefetch_or_after_a_checkpoint_loses_nothing(small_store, tmp_path, point):
    """SIGKILL while the feed reads ahead (or right after a checkpoint), then --resume: the same weights and loss
    curve as an uninterrupted run."""
    from sae_kit.cli import main
    from tests.sae_kit.test_train import lines

    args = ["--activations", str(small_store), "--tokens", "6144", "--batch-size", "256", "--k", "4",
            "--expansion", "2", "--checkpoint-every", "768", "--log-every", "2", "--no-progress"]
    assert main(["train", *args, "--out", str(tmp_path / "full")]) == 0
    killed = subprocess.run([sys.executable, "-c", DRIVER, point, "train", *args, "--out", str(tmp_path / "cut")],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "cut") is not None and not (tmp_path / "cut" / "topk").exists()
    assert main(["train", *args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    a, b = SparseCoder.load(tmp_path / "full" / "topk"), SparseCoder.load(tmp_path / "cut" / "topk")
    for name, p in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], p, rtol=1e-5, atol=1e-6)
    la, lb = lines(tmp_path / "full" / "topk"), lines(tmp_path / "cut" / "topk")
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5)


# -- no host sync outside sync points -----------------------------------------------------------------------------

SYNCING = [(torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "__bool__"), (torch.Tensor, "__float__"),
           (torch.Tensor, "__int__"), (torch.Tensor, "nonzero"), (torch, "nonzero"), (torch, "bincount"),
           (torch, "unique"), (torch.Tensor, "unique"), (torch, "masked_select"),
           (torch, "tensor")]  # from Python data onto a GPU: a blocking host-to-device copy
DENSE = ("jumprelu", "relu", "gated")


# BatchTopK (and Matryoshka, built on it) reads one thing per step: the widest row's count of kept latents, which
# sizes the decoder's slots (and once more on the rare step that widens its candidate lists).
READS_PER_STEP = {"topk": [], "abstopk": [], "jumprelu": [], "relu": [], "gated": [], "kron": [], "adaptivek": [],
                  "matching_pursuit": [], "batchtopk": ["tolist"], "matryoshka_batchtopk": ["tolist"]}


@pytest.mark.parametrize("arch", sorted(READS_PER_STEP))
def test_steps_between_sync_points_never_read_the_device(tmp_path, monkeypatch, arch):
    """Outside sync points the step calls none of the operations that make the host wait for a GPU (read a value,
    size a tensor by its data, copy Python data to it), BatchTopK's one read aside. On CPU this is checked by
    intercepting them, with the device code paths forced; the CUDA test below checks the device."""
    import sae_kit.sae.batchtopk as batchtopk
    import sae_kit.train.loop as loop

    monkeypatch.setattr(batchtopk, "_on_host", lambda t: False)  # numpy's selection stands in for device ops

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    state = {"sync": False, "calls": []}
    real_sync, real_raise = loop._sync_point, loop._raise_if_halted

    def in_sync(fn):
        def run(*a, **k):
            state["sync"] = True
            try:
                return fn(*a, **k)
            finally:
                state["sync"] = False
        return run

    monkeypatch.setattr(loop, "_sync_point", in_sync(real_sync))
    monkeypatch.setattr(loop, "_raise_if_halted", in_sync(real_raise))
    real_step = loop._step

    def step(*a, **k):
        state["stepping"] = True
        state["calls"].append([])
        try:
            return real_step(*a, **k)
        finally:
            state["stepping"] = False

    monkeypatch.setattr(loop, "_step", step)
    for owner, name in SYNCING:
        original = getattr(owner, name)

        def guarded(*a, _original=original, _name=name, **k):
            if state.get("stepping") and not state["sync"]:
                state["calls"][-1].append(_name)
            return _original(*a, **k)
        monkeypatch.setattr(owner, name, guarded)
    for name in ("__getitem__", "__setitem__"):  # indexing by a bool mask sizes the result by the data
        original = getattr(torch.Tensor, name)

        def indexed(self, index, *rest, _original=original, _name=name):
            parts = index if isinstance(index, tuple) else (index,)
            if state.get("stepping") and not state["sync"] and any(
                    isinstance(p, torch.Tensor) and p.dtype == torch.bool and p.ndim > 0 for p in parts):
                state["calls"][-1].append(f"{_name}[bool mask]")
            return _original(self, index, *rest)
        monkeypatch.setattr(torch.Tensor, name, indexed)
    extra = {"sparsity_coefficient": 1e-3} if arch in DENSE else {}
    cfg = TrainConfig(hook_points=HOOK, architecture=arch, k=4, d_sae=64, n_tokens=256 * 25, batch_size=256, lr=1e-3,
                      out=str(tmp_path), log_every=10, dead_tokens_threshold=256 * 3, dtype="bfloat16", **extra)
    train(cfg, TensorSource({HOOK: x}), progress=False)
    reads, steps = state["calls"], 25
    assert len(reads) == steps
    allowed = READS_PER_STEP[arch]
    assert all(r[:len(allowed)] == allowed and set(r) <= set(allowed) for r in reads), reads
    assert sum(map(len, reads)) <= len(allowed) * steps + 2, reads  # widening: a step or two at the start


SHIPPED = sorted(a for a, cls in SparseCoder.REGISTRY.items() if cls.__module__.startswith("sae_kit."))
"""The architectures sae-kit ships (other test modules register stand-ins of their own)."""


@pytest.mark.parametrize("arch", SHIPPED)
def test_training_forwards_make_no_tensor_from_python_data(monkeypatch, arch):
    """No architecture's training forward (AuxK on) builds a tensor from Python data: on a GPU that is a blocking
    host-to-device copy in every step."""
    extra = {"sparsity_coefficient": 1e-3} if arch in DENSE else {"k": 4}
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=16, d_sae=64, **extra))
    x, dead = torch.randn(256, 16), torch.arange(0, 64, 3)

    def forbidden(*a, **k):
        raise AssertionError("torch.tensor in a training forward")

    monkeypatch.setattr(torch, "tensor", forbidden)
    for precision in (None, torch.bfloat16):
        with sae.training_precision(precision):
            sae(x, dead_latents=dead, sparsity_coefficient=1e-3).loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steps_between_sync_points_do_not_synchronize(tmp_path, monkeypatch):
    """On CUDA, torch's sync debug mode raises on any synchronizing call inside a step between sync points."""
    import sae_kit.train.loop as loop

    real_step = loop._step

    def step(*a, **k):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_step(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(loop, "_step", step)
    x = torch.randn(8192, 64)
    cfg = TrainConfig(hook_points=HOOK, architecture="topk", k=8, d_sae=512, n_tokens=1024 * 20, batch_size=1024,
                      out=str(tmp_path), log_every=10, dead_tokens_threshold=1024 * 3, device="cuda")
    train(cfg, TensorSource({HOOK: x}), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batchtopk_steps_wait_once(tmp_path, monkeypatch):
    """BatchTopK's step waits for the device once (the widest row sizes the decoder), plus a retry when it widens."""
    import warnings

    import sae_kit.train.loop as loop

    real_step = loop._step
    waits = []

    def step(*a, **k):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return real_step(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                waits.append(sum("synchroniz" in str(w.message) for w in seen))

    monkeypatch.setattr(loop, "_step", step)
    x = torch.randn(8192, 64)
    cfg = TrainConfig(hook_points=HOOK, architecture="batchtopk", k=8, d_sae=512, n_tokens=1024 * 20,
                      batch_size=1024, out=str(tmp_path), log_every=10, dead_tokens_threshold=1024 * 3, device="cuda")
    train(cfg, TensorSource({HOOK: x}), progress=False)
    assert len(waits) == 20 and all(w >= 1 for w in waits) and sum(waits) <= 20 + 2, waits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_feed_delivers_the_batches_without_a_flagged_sync():
    """On a GPU the feed hands over the source's batches on the device, and its thread's wait for each copy is not
    one torch's sync debug mode flags (the mode is process-wide: a flagged wait there would fail the step's check)."""
    shards = [{HOOK: torch.randn(256, 8), "y": torch.randn(256, 3)} for _ in range(12)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = list(BatchFeed(iter(shards), "cuda", depth=2))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(a.is_cuda for batch in got for a in batch.values())
    _assert_same([{h: a.cpu() for h, a in batch.items()} for batch in got], shards)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_feed_gathers_into_pinned_buffers_and_reuses_them():
    """On CUDA the batches are gathered straight into pinned host tensors (so pin_memory() copies nothing), which the
    feed reuses once their copy has finished; the device batches are the synchronous reader's."""
    from activation_store.buffers import BatchBuffers

    pool = BatchBuffers(pin_memory=True)
    src = TensorSource({HOOK: torch.randn(4096, 32), "y": torch.randn(4096, 8)})
    want = list(src.batches([HOOK, "y"], 256, seed=1, epochs=2))
    got = [{h: a.cpu() for h, a in b.items()}
           for b in BatchFeed(src.batches([HOOK, "y"], 256, seed=1, epochs=2, buffers=pool), "cuda", buffers=pool)]
    _assert_same(got, want)
    free = [t for ts in pool._free.values() for t in ts]
    assert free and all(t.is_pinned() for t in free)
    assert len(pool._made) <= 2 * 5  # two hook points, at most depth + 2 batches in flight


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_feed_of_a_bfloat16_source_gives_the_float32_batches():
    """A bfloat16 source crosses in bfloat16 and arrives as the float32 batches a host float32 read gives."""
    from sae_kit.train.feed import training_feed

    src = TensorSource({HOOK: torch.randn(4096, 32).bfloat16(), "y": torch.randn(4096, 8).bfloat16()})
    want = list(src.batches([HOOK, "y"], 256, seed=1, epochs=2))
    got = [{h: a.cpu() for h, a in b.items()}
           for b in training_feed(src, [HOOK, "y"], 256, "cuda", seed=1, epochs=2)]
    _assert_same(got, want)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_cuda_feed_copies_16_bit_rows_as_stored_and_converts_them_on_the_device(monkeypatch, stored):
    """A 16-bit source's rows cross to the GPU in their stored dtype (half the bytes of float32) and arrive as the
    float32 batches a synchronous float32 read gives, in the same order; the host tensors are still recycled."""
    from activation_store.buffers import BatchBuffers
    from sae_kit.train import feed as feed_module

    _CudaStandIns(monkeypatch)
    stand_in_to, crossed = torch.Tensor.to, []

    def to(t, *args, **kwargs):
        if any(isinstance(a, torch.device) and a.type == "cuda" for a in args):
            crossed.append(t.dtype)
        return stand_in_to(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    made = []
    monkeypatch.setattr(feed_module, "BatchBuffers", lambda pin_memory: made.append(BatchBuffers()) or made[-1])
    gen = torch.Generator().manual_seed(0)
    source = TensorSource({HOOK: torch.randn(64, 5, generator=gen).to(stored),
                           "y": torch.randn(64, 3, generator=gen).to(stored)})
    kw = dict(shuffle=True, seed=3, epochs=2, start_batch=1)
    got = list(feed_module.training_feed(source, [HOOK, "y"], 16, "cuda", **kw))
    want = list(source.batches([HOOK, "y"], 16, **kw))  # float32 gathered on the host
    _assert_same(got, want)
    assert crossed == [stored] * 2 * len(want)
    assert 0 < len(made[0]._made) <= 2 * (feed_module.DEPTH + 3)  # recycled: not a pair per batch


def test_cuda_feed_keeps_float32_and_mixed_sources_as_they_are(monkeypatch):
    """Only a source stored wholly in 16 bits crosses in 16 bits; an explicit dtype is honoured as given."""
    from sae_kit.train.feed import _wire_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    bf16 = TensorSource({HOOK: torch.zeros(4, 2, dtype=torch.bfloat16), "y": torch.zeros(4, 2, dtype=torch.bfloat16)})
    mixed = TensorSource({HOOK: torch.zeros(4, 2, dtype=torch.bfloat16), "y": torch.zeros(4, 2)})
    assert _wire_dtype(bf16, [HOOK, "y"], cuda) == torch.bfloat16
    assert _wire_dtype(bf16, [HOOK, "y"], cpu) is None  # on a CPU the rows are converted once, while gathered
    assert _wire_dtype(mixed, [HOOK, "y"], cuda) is None
    assert _wire_dtype(mixed, [HOOK], cuda) == torch.bfloat16
    assert _wire_dtype(TensorSource({HOOK: torch.zeros(4, 2)}), [HOOK], cuda) is None
    assert _wire_dtype(object(), [HOOK], cuda) is None  # a source of the user's own, without stored_dtype


def test_feed_threads_set_the_gathers_threads_in_the_feeds_thread_alone(tmp_path, monkeypatch):
    """`FEED_THREADS` (bench_gpu's A/B of the feed's intra-op threads) sets the thread count the source's gathers
    run with, in the feed's thread; the training thread keeps its own, threads started after the feed get the
    count from before, and the same batches train the same weights."""
    import sae_kit.train.feed as feed_module

    x = torch.randn(1024, 16)
    source = TensorSource({HOOK: x})
    seen: list[int] = []
    real = source.batches

    def counting(*a, **kw):
        for batch in real(*a, **kw):
            if threading.current_thread().name == "sae-kit-batch-feed":  # not publishing's reads
                seen.append(torch.get_num_threads())
            yield batch

    monkeypatch.setattr(source, "batches", counting)
    before = torch.get_num_threads()
    cfg = TrainConfig(hook_points=HOOK, k=4, d_sae=64, batch_size=128, n_tokens=128 * 6, log_every=100)
    a = SparseCoder.load(train(cfg.replace(out=str(tmp_path / "a")), source, progress=False))
    assert seen and set(seen) == {before}
    other = 1 if before > 1 else 2
    monkeypatch.setattr(feed_module, "FEED_THREADS", other)
    seen.clear()
    b = SparseCoder.load(train(cfg.replace(out=str(tmp_path / "b")), source, progress=False))
    assert seen and set(seen) == {other}
    assert torch.get_num_threads() == before
    later: list[int] = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [before]
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
