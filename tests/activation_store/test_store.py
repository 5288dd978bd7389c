"""The activation store: round trip against direct capture, resume after crashes, verification, bad input."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from activation_store import storage as storage_mod
from activation_store import store as store_mod
from activation_store.capture import capture_rows, token_batches
from activation_store.store import ActivationStore, CacheConfig, cache_activations
from activation_store.streaming import StreamingActivations
from activation_store.tokens import DatasetConfig

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"
TWIN = "blocks.1.hook_resid_pre"  # equals H0 row for row: a direct check of cross-hook alignment


@pytest.fixture(scope="module")
def docs(tmp_path_factory, snippets) -> Path:
    """A small jsonl corpus of Python snippets (much faster to tokenize than the stdlib)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(120):
            f.write(json.dumps({"text": "".join(rng.choice(snippets) for _ in range(3)), "id": i}) + "\n")
    return path


def make_cfg(model_path, docs, out, **kw) -> CacheConfig:
    base = dict(model=str(model_path), backend="transformer_lens", hook_points=(H0, H1),
                dataset=DatasetConfig(path=str(docs), context_size=16), n_tokens=1000, batch_size=4,
                shard_tokens=128, out=str(out))
    base.update(kw)
    return CacheConfig(**base)


def shard_hashes(out) -> list[dict[str, str]]:
    manifest = store_mod.Storage(str(out)).read_json(store_mod.MANIFEST)
    return [{k: f["sha256"] for k, f in s["files"].items()} for s in manifest["shards"]]


@pytest.fixture(scope="module")
def ref_store(tiny_model, tiny_gpt2_path, docs, tmp_path_factory):
    """An uninterrupted run every resume is compared against."""
    out = tmp_path_factory.mktemp("ref") / "store"
    cfg = make_cfg(tiny_gpt2_path, docs, out, hook_points=(H0, H1, TWIN))
    cache_activations(cfg, progress=False, model=tiny_model)
    return cfg


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows in lexicographic order, to compare multisets of rows."""
    for col in reversed(range(x.shape[1])):
        x = x[torch.argsort(x[:, col], stable=True)]
    return x


def row_counts(x: torch.Tensor) -> Counter:
    """Multiset of rows (the snippet corpus repeats, so some rows occur more than once)."""
    return Counter(tuple(r) for r in x.tolist())


def direct_rows(model, cfg: CacheConfig) -> dict[str, torch.Tensor]:
    rows = [capture_rows(model, b, cfg.hook_points, cfg.exclude_special)
            for b in token_batches(model, cfg.dataset, cfg.batch_size, cfg.n_tokens)]
    out = {h: torch.cat([r.acts[h] for r in rows]) for h in cfg.hook_points}
    out["tokens"] = torch.cat([r.tokens for r in rows])
    return out


def test_round_trip_equals_direct_capture(ref_store, tiny_model):
    store = ActivationStore.open(ref_store.out)
    want = direct_rows(tiny_model, ref_store)
    all_tokens = torch.cat([b.tokens.flatten() for b in token_batches(tiny_model, ref_store.dataset, 4, 1000)])
    assert len(all_tokens) == 63 * 16  # 1000 tokens rounded up to whole contexts
    n_bos = int((all_tokens == tiny_model.bos_token_id).sum())
    assert n_bos > 0 and store.n_rows == len(want[H0]) == len(all_tokens) - n_bos
    assert len(store.manifest["shards"]) == 8  # 63 contexts; 2 forward batches of 4 contexts per shard
    shuffled = list(store.batches([H0, H1], batch_size=50, seed=3))
    assert len(shuffled) == store.n_rows // 50
    for h in (H0, H1):
        got = torch.cat([b[h] for b in shuffled])
        assert not torch.equal(got, want[h][: len(got)])  # really shuffled
    # Every row exactly once: compare the full multiset through one batch holding all rows.
    (whole,) = list(store.batches([H0, H1], batch_size=store.n_rows, seed=3))
    for h in (H0, H1):
        assert torch.equal(sorted_rows(whole[h]), sorted_rows(want[h]))
    # Sequential reading is store order, which is token-stream order; row_tokens maps rows back to tokens.
    seq = torch.cat([b[H0] for b in store.batches([H0], batch_size=1, shuffle=False)])
    assert torch.equal(seq, want[H0])
    assert torch.equal(store.row_tokens().tokens, want["tokens"])


def test_norm_stats_match_rows(ref_store, tiny_model):
    store = ActivationStore.open(ref_store.out)
    x = direct_rows(tiny_model, ref_store)[H1].double()
    stats = store.norm_stats(H1)
    torch.testing.assert_close(stats.mean, x.mean(0).float())
    assert stats.mean_sq_norm == pytest.approx(float((x * x).sum(1).mean()), rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("copy_stream", [False, True])
def test_cuda_cache_writes_the_rows_a_blocking_capture_gives(tiny_gpt2_path, docs, tmp_path, monkeypatch,
                                                             copy_stream):
    """On CUDA the rows reach the host through pinned buffers filled by asynchronous copies (on the forward's
    stream, or on one of their own), read by the writer threads once the shard's copy event completed: the files
    hold the rows (and sums) of a blocking capture."""
    from activation_store.model import load_model

    monkeypatch.setattr(store_mod, "COPY_STREAM", copy_stream)

    model = load_model(str(tiny_gpt2_path), backend="hf", device="cuda")
    hooks = ("transformer.h.0", "transformer.h.1.mlp")
    cfg = make_cfg(tiny_gpt2_path, docs, tmp_path / "store", backend="hf", hook_points=hooks, device="cuda")
    cache_activations(cfg, progress=False, model=model)
    store, want = ActivationStore.open(cfg.out), direct_rows(model, cfg)
    for h in hooks:
        got = torch.cat([b[h] for b in store.batches([h], batch_size=1, shuffle=False)])
        torch.testing.assert_close(got, want[h], rtol=1e-5, atol=1e-6)
        x = want[h].double()
        torch.testing.assert_close(store.norm_stats(h).mean, x.mean(0).float(), rtol=1e-5, atol=1e-6)
        assert store.norm_stats(h).mean_sq_norm == pytest.approx(float((x * x).sum(1).mean()), rel=1e-6)


def test_batches_deterministic_and_start_batch(ref_store):
    store = ActivationStore.open(ref_store.out)
    kw = dict(batch_size=32, seed=7, epochs=3, buffer_rows=200)
    full = list(store.batches([H0, H1], **kw))
    again = list(store.batches([H0, H1], **kw))
    assert len(full) == (3 * store.n_rows) // 32
    assert all(torch.equal(a[H0], b[H0]) for a, b in zip(full, again))
    other = next(iter(store.batches([H0, H1], **{**kw, "seed": 8})))
    assert not torch.equal(other[H0], full[0][H0])
    for start in (1, 13, len(full) // 3 + 1, len(full) - 1):  # incl. across an epoch boundary
        tail = list(store.batches([H0, H1], start_batch=start, **kw))
        assert len(tail) == len(full) - start
        assert all(torch.equal(a[h], b[h]) for a, b in zip(full[start:], tail) for h in (H0, H1))
    # Each epoch covers the rows once: 3 epochs hold every row 3 times, up to the dropped partial batch.
    got = row_counts(torch.cat([b[H0] for b in full]))
    thrice = Counter({r: 3 * c for r, c in row_counts(
        torch.cat([b[H0] for b in store.batches([H0], batch_size=1, shuffle=False)])).items()})
    assert not got - thrice and sum((thrice - got).values()) < 32


def test_two_hook_batches_are_row_aligned(ref_store):
    store = ActivationStore.open(ref_store.out)
    for batch in store.batches([H0, TWIN], batch_size=40, seed=1, buffer_rows=150):
        assert torch.equal(batch[H0], batch[TWIN])  # resid_post of block 0 is resid_pre of block 1


def test_bfloat16_and_memory_storage(ref_store, tiny_model):
    cfg = CacheConfig(**{**ref_store.__dict__, "out": "memory://sae-kit-test/bf16", "dtype": "bfloat16",
                         "hook_points": (H0,)})
    cache_activations(cfg, progress=False, model=tiny_model)
    store = ActivationStore.open(cfg.out)
    assert store.stored_dtype(H0) == torch.bfloat16 and ActivationStore.open(ref_store.out).stored_dtype(H0) == torch.float32
    (whole,) = list(store.batches([H0], batch_size=store.n_rows, shuffle=False, dtype=torch.bfloat16))
    assert torch.equal(whole[H0], direct_rows(tiny_model, ref_store)[H0].bfloat16())
    # float32 in memory:// is byte-identical to the local store
    mem = CacheConfig(**{**ref_store.__dict__, "out": "memory://sae-kit-test/f32"})
    cache_activations(mem, progress=False, model=tiny_model)
    assert shard_hashes(mem.out) == shard_hashes(ref_store.out)


def test_flipped_byte_is_caught(ref_store, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(ref_store.out, out)
    victim = out / H1 / "shard_00003.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01
    victim.write_bytes(bytes(data))
    store = ActivationStore.open(str(out))  # sizes are fine: hashes are checked on read
    with pytest.raises(ValueError, match=r"shard_00003.*sha256"):
        list(store.batches([H0, H1], batch_size=64))
    with pytest.raises(ValueError, match="shard_00003"):
        store.verify_all()
    list(ActivationStore.open(str(out), verify=False).batches([H1], batch_size=64))  # opt-out reads it


def test_each_file_is_hashed_once_until_it_changes(ref_store, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(ref_store.out, out)
    hashed = []
    real = store_mod.sha256
    monkeypatch.setattr(store_mod, "sha256", lambda data: hashed.append(len(data)) or real(data))
    store = ActivationStore.open(str(out))
    n_files = len(store.manifest["shards"])
    list(store.batches([H1], batch_size=64, epochs=3))
    assert len(hashed) == n_files  # three epochs, one hash per file
    victim = out / H1 / "shard_00003.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01
    replacement = out / H1 / "replacement"
    replacement.write_bytes(bytes(data))
    os.replace(replacement, victim)  # another file now: hashed again, and caught
    with pytest.raises(ValueError, match=r"shard_00003.*sha256"):
        list(store.batches([H1], batch_size=64))


def test_truncated_shard_and_incomplete_store(ref_store, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(ref_store.out, out)
    victim = out / H0 / "shard_00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"shard_00001.*truncated"):
        ActivationStore.open(str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="incomplete"):
        ActivationStore.open(str(out))
    with pytest.raises(FileNotFoundError, match="not an activation store"):
        ActivationStore.open(str(tmp_path / "nothing"))


def test_check_names_the_mismatch(ref_store):
    store = ActivationStore.open(ref_store.out)
    store.check(model=ref_store.model, hook_point=H0, d_in=32)
    with pytest.raises(ValueError, match="not 'gpt2'"):
        store.check(model="gpt2")
    with pytest.raises(ValueError, match="no hook point 'blocks.3.hook_resid_post'"):
        store.check(hook_point="blocks.3.hook_resid_post")
    with pytest.raises(ValueError, match="not 64"):
        store.check(hook_point=H0, d_in=64)


def crash_at(cfg: CacheConfig, model, monkeypatch, point: str, shard: int) -> None:
    """Start a cache and stop it at a kill point of one shard (`store._kill_point`), as a kill would."""
    def crash(p, s):
        if (p, s) == (point, shard):
            raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "_kill_point", crash)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(cfg, progress=False, model=model)
    monkeypatch.undo()


@pytest.mark.parametrize("point,shard", [("mid_shard", 1), ("before_manifest", 2), ("after_shard", 0)])
def test_resume_after_crash_in_process(ref_store, tiny_model, tmp_path, monkeypatch, point, shard):
    cfg = CacheConfig(**{**ref_store.__dict__, "out": str(tmp_path / "s")})
    crash_at(cfg, tiny_model, monkeypatch, point, shard)
    done = shard + (point == "after_shard")
    assert len(shard_hashes(cfg.out)) == done
    calls = []
    real = store_mod.token_batches
    monkeypatch.setattr(store_mod, "token_batches", lambda *a, **k: calls.append(k) or real(*a, **k))
    cache_activations(cfg, progress=False, model=tiny_model)
    assert calls[0]["skip_batches"] == done * cfg.batches_per_shard  # skipped, not recomputed
    assert shard_hashes(cfg.out) == shard_hashes(ref_store.out)
    assert json.loads((tmp_path / "s/manifest.json").read_text())["norm_stats"] == \
        json.loads(Path(ref_store.out, "manifest.json").read_text())["norm_stats"]


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from activation_store import store
    from activation_store.model import load_model
    from activation_store.tokens import DatasetConfig

    model_path, docs, out, point, shard, ahead = sys.argv[1:7]
    shard, ahead = int(shard), int(ahead)
    hooks = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_pre")
    model = load_model(model_path, backend="transformer_lens", device="cpu")
    forwarded = []
    capture = model.capture
    model.capture = lambda *a, **k: forwarded.append(1) or capture(*a, **k)

    def kill(p, s):
        # SIGKILL at one kill point; with `ahead`, only once the forward has run that many batches and the
        # writers have written every file of the next shard, this one still unlisted.
        if (p, s) != (point, shard):
            return
        following = [Path(out, d, f"shard_{shard + 1:05d}.safetensors") for d in (*hooks, "tokens")]
        deadline = time.monotonic() + 120
        while ahead and (len(forwarded) < ahead or not all(f.exists() for f in following)):
            if time.monotonic() > deadline:
                print(f"not ahead: {len(forwarded)} batches forwarded", flush=True)
                os._exit(3)
            time.sleep(0.01)
        print(f"forwarded {len(forwarded)}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    store._kill_point = kill
    store.cache_activations(store.CacheConfig(model=model_path, backend="transformer_lens", hook_points=hooks,
        dataset=DatasetConfig(path=docs, context_size=16), n_tokens=1000, batch_size=4, shard_tokens=128, out=out),
        progress=False, model=model)
""")


def run_killed(ref_store, docs, out, point: str, shard: int, ahead: int = 0) -> subprocess.CompletedProcess:
    """Run the cache in a subprocess that SIGKILLs itself at a kill point (see KILL_SCRIPT)."""
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, ref_store.model, str(docs), str(out), point,
                           str(shard), str(ahead)], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-2000:]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    return proc


def resume_and_compare(ref_store, tiny_model, out) -> None:
    cache_activations(CacheConfig(**{**ref_store.__dict__, "out": str(out)}), progress=False, model=tiny_model)
    assert shard_hashes(out) == shard_hashes(ref_store.out)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_sigkill_during_overlapped_write_loses_nothing(ref_store, tiny_model, docs, tmp_path):
    """Killed while the commit of shard 3 waits, the writers have written all of shard 4 and the forward is in
    shard 5: the three listed shards stand, and the resume ends with the shards of an uninterrupted run."""
    out = tmp_path / "killed"
    proc = run_killed(ref_store, docs, out, "before_manifest", 3, ahead=11)
    assert int(proc.stdout.split()[-1]) >= 11  # 2 forward batches per shard: the forward was in shard 5
    assert len(shard_hashes(out)) == 3
    for shard in (3, 4):  # written, never listed
        assert all((out / d / f"shard_{shard:05d}.safetensors").exists() for d in (H0, H1, TWIN, "tokens"))
    resume_and_compare(ref_store, tiny_model, out)


@pytest.mark.slow
@pytest.mark.parametrize("point,shard", [("after_shard", 2), ("mid_shard", 4), ("before_manifest", 5)])
def test_resume_after_sigkill(ref_store, tiny_model, docs, tmp_path, point, shard):
    out = tmp_path / "killed"
    run_killed(ref_store, docs, out, point, shard)
    listed = len(shard_hashes(out))
    if point == "mid_shard":  # killed in a writer: earlier shards may still have been on their way
        assert listed <= shard
    else:  # killed in the commit stage, which lists shards strictly in order
        assert listed == shard + (point == "after_shard")
    resume_and_compare(ref_store, tiny_model, out)


def test_disk_full_keeps_store_consistent(ref_store, tiny_model, tmp_path, monkeypatch):
    cfg = CacheConfig(**{**ref_store.__dict__, "out": str(tmp_path / "s")})
    real = storage_mod._write_all

    def write(f, data):
        if f"{H1}/.shard_00002." in f.name:  # the second file of shard 2
            f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(storage_mod, "_write_all", write)
    with pytest.raises(OSError, match="disk full while writing shard 2") as err:
        cache_activations(cfg, progress=False, model=tiny_model)
    assert err.value.errno == errno.ENOSPC
    assert len(shard_hashes(cfg.out)) == 2
    # Nothing unlisted stays: neither temporaries nor the files of shard 2 or of shards written after it.
    listed = {f["path"] for s in store_mod.Storage(cfg.out).read_json("manifest.json")["shards"]
              for f in s["files"].values()}
    on_disk = {p.relative_to(cfg.out).as_posix() for p in Path(cfg.out).rglob("*") if p.is_file()}
    assert on_disk == listed | {"manifest.json"}
    monkeypatch.undo()
    cache_activations(cfg, progress=False, model=tiny_model)
    assert shard_hashes(cfg.out) == shard_hashes(ref_store.out)


def test_nan_activations_are_refused(ref_store, tiny_model, tmp_path, monkeypatch):
    cfg = CacheConfig(**{**ref_store.__dict__, "out": str(tmp_path / "s")})
    real, calls = tiny_model.capture, []

    def poisoned(*a, **k):
        acts = real(*a, **k)
        calls.append(1)
        if len(calls) == 5:  # first batch of shard 2
            acts[H1][1, :, 7] = float("nan")  # (B, C, d): a whole context, so kept rows are hit
        return acts

    monkeypatch.setattr(tiny_model, "capture", poisoned)
    with pytest.raises(ValueError, match=r"hook point 'blocks.1.hook_mlp_out' \(shard 2, batch 0"):
        cache_activations(cfg, progress=False, model=tiny_model)
    assert len(shard_hashes(cfg.out)) == 2
    assert not list(Path(cfg.out).rglob("shard_00002*"))


STAGE_FAILURES = {  # where each stage raises, and the most batches the forward may run before it stops
    "tokens": 3, "forward": 3, "write": 12, "commit": 12,
}


@pytest.mark.parametrize("stage", sorted(STAGE_FAILURES))
def test_an_error_in_any_stage_stops_all_and_surfaces_once(ref_store, tiny_model, tmp_path, monkeypatch, stage):
    # One context per batch and per shard: 63 forward batches, so a stage that kept going would show.
    cfg = CacheConfig(**{**ref_store.__dict__, "out": str(tmp_path / "s"), "batch_size": 1, "shard_tokens": 16})
    boom = RuntimeError(f"boom in {stage}")
    real_batches, real_capture, forwarded = store_mod.token_batches, tiny_model.capture, []

    def batches(*a, **k):
        for i, b in enumerate(real_batches(*a, **k)):
            if i == 3:
                raise boom
            yield b

    def capture(*a, **k):
        forwarded.append(1)
        if stage == "forward" and len(forwarded) == 3:
            raise boom
        return real_capture(*a, **k)

    def kill_point(point, shard):
        if (stage, point, shard) in (("write", "mid_shard", 2), ("commit", "after_shard", 1)):
            raise boom

    if stage == "tokens":
        monkeypatch.setattr(store_mod, "token_batches", batches)
    monkeypatch.setattr(tiny_model, "capture", capture)
    monkeypatch.setattr(store_mod, "_kill_point", kill_point)
    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    with pytest.raises(RuntimeError) as err:
        cache_activations(cfg, progress=False, model=tiny_model)
    assert err.value is boom and str(err.value) == f"boom in {stage}"
    assert not uncaught  # no thread died with an error of its own
    assert not [t for t in threading.enumerate() if t.name.startswith("sae-kit-cache")]  # every stage ended
    assert len(forwarded) <= STAGE_FAILURES[stage]  # stopped promptly: 63 batches otherwise
    # Shards handed over before the error are committed; nothing else is left on disk.
    manifest = store_mod.Storage(cfg.out).read_json("manifest.json")
    listed = {f["path"] for s in manifest["shards"] for f in s["files"].values()}
    on_disk = {p.relative_to(cfg.out).as_posix() for p in Path(cfg.out).rglob("*") if p.is_file()}
    assert on_disk == listed | {"manifest.json"}
    if stage == "tokens":  # its error may stop the forward before or after it hands shards over
        assert len(manifest["shards"]) <= len(forwarded)
    else:
        assert len(manifest["shards"]) == 2


def test_a_foreign_folder_is_refused_untouched(ref_store, tiny_model, tmp_path):
    """A folder that is not a store is refused before anything in it is touched, whatever its files are named."""
    folder = tmp_path / "mine"
    files = {
        "sub/report.tmp-final.txt": "a user's file",
        ".manifest.json.tmp-abcd1234.tmp": "named like a temporary of ours",
        f"{H0}/.shard_00000.safetensors.tmp-abcd1234.tmp": "in a folder named like ours",
        "tokens/.shard_00001.safetensors.tmp-zz_99xyz.tmp": "the same",
    }
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    cfg = CacheConfig(**{**ref_store.__dict__, "out": str(folder)})
    with pytest.raises(ValueError, match=r"is not empty and holds no manifest.json"):
        cache_activations(cfg, progress=False, model=tiny_model)
    (folder / "manifest.json").write_text(json.dumps({"format": "someone-elses"}))
    with pytest.raises(ValueError, match="is not a sae-kit activation manifest"):
        cache_activations(cfg, progress=False, model=tiny_model)
    (folder / "manifest.json").write_text("not json")
    with pytest.raises(ValueError, match="is not a sae-kit activation manifest"):
        cache_activations(cfg, progress=False, model=tiny_model)
    for rel, text in files.items():
        assert (folder / rel).read_text() == text
    only_ours = tmp_path / "killed_at_first_commit"
    only_ours.mkdir()
    (only_ours / ".manifest.json.tmp-abcd1234.tmp").write_text("{")
    with pytest.raises(ValueError, match="killed before its first commit"):
        cache_activations(CacheConfig(**{**cfg.__dict__, "out": str(only_ours)}), progress=False, model=tiny_model)
    assert (only_ours / ".manifest.json.tmp-abcd1234.tmp").exists()


def test_resume_removes_only_its_own_temporaries(ref_store, tiny_model, tmp_path, monkeypatch):
    cfg = CacheConfig(**{**ref_store.__dict__, "out": str(tmp_path / "s")})
    crash_at(cfg, tiny_model, monkeypatch, "after_shard", 1)
    out = Path(cfg.out)
    ours = [".manifest.json.tmp-abcd1234.tmp", f"{H0}/.shard_00002.safetensors.tmp-abcd1234.tmp",
            "tokens/.shard_00003.safetensors.tmp-x_1y2z3w.tmp"]
    theirs = ["notes.tmp-keep.txt", f"{H1}/.report.tmp-abcd1234.tmp",
              f"{H0}/sub/.shard_00002.safetensors.tmp-abcd1234.tmp", "other/.shard_00002.safetensors.tmp-abcd1234.tmp",
              "tokens/.shard_2.safetensors.tmp-abcd1234.tmp"]
    for rel in ours + theirs:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("x")
    cache_activations(cfg, progress=False, model=tiny_model)
    assert shard_hashes(cfg.out) == shard_hashes(ref_store.out)
    assert not [rel for rel in ours if (out / rel).exists()]
    assert all((out / rel).read_text() == "x" for rel in theirs)


def test_bad_inputs(ref_store, tiny_model, tmp_path, docs):
    with pytest.raises(ValueError, match="n_tokens must be a positive integer, got 0"):
        CacheConfig(n_tokens=0)
    with pytest.raises(ValueError, match="-5"):
        CacheConfig(n_tokens=-5)
    with pytest.raises(ValueError, match="dtype must be one of"):
        CacheConfig(dtype="int8")
    base = ref_store.__dict__
    with pytest.raises(ValueError, match=r"unknown hook point 'blocks.0.hook_resid_pots'.*blocks.0.hook_resid_post"):
        cache_activations(CacheConfig(**{**base, "hook_points": ("blocks.0.hook_resid_pots",),
                                         "out": str(tmp_path / "a")}), progress=False, model=tiny_model)
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text(json.dumps({"content": "x = 1\n"}) + "\n")
    with pytest.raises(ValueError, match="no text column 'text'.*content"):
        cache_activations(CacheConfig(**{**base, "dataset": DatasetConfig(path=str(nocol), context_size=16),
                                         "out": str(tmp_path / "b")}), progress=False, model=tiny_model)
    assert not (tmp_path / "b" / "manifest.json").exists()
    # Contexts longer than the model's 128 positions: refused before anything is written, so the same --out can be
    # used again with a size that fits; a stream refuses them too.
    long = dataclasses.replace(base["dataset"], context_size=256)
    with pytest.raises(ValueError, match="context_size 256 exceeds .* maximum context of 128 tokens"):
        cache_activations(CacheConfig(**{**base, "dataset": long, "out": str(tmp_path / "c")}), progress=False,
                          model=tiny_model)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    with pytest.raises(ValueError, match="context_size 256 exceeds"):
        StreamingActivations(tiny_model, [H0], long, 1000)
    # A folder holding a different run names the differing fields; a complete one is left alone.
    with pytest.raises(ValueError, match="different run") as err:
        cache_activations(CacheConfig(**{**base, "n_tokens": 2000, "dtype": "float16"}), progress=False)
    assert "n_tokens: stored 1000, requested 2000" in str(err.value)
    assert "dtype: stored 'float32', requested 'float16'" in str(err.value)
    before = Path(base["out"], "manifest.json").stat().st_mtime_ns
    assert cache_activations(ref_store, progress=False) == ref_store.out  # no model load needed
    assert Path(base["out"], "manifest.json").stat().st_mtime_ns == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        cache_activations(CacheConfig(**{**base, "out": str(foreign)}), progress=False, model=tiny_model)


def test_streaming_matches_store(ref_store, tiny_model):
    stream = StreamingActivations(tiny_model, [H0, H1], ref_store.dataset, ref_store.n_tokens,
                                  batch_size_contexts=4, buffer_rows=300, seed=5)
    want = direct_rows(tiny_model, ref_store)
    assert stream.d_in(H0) == 32
    # norm stats come from the first fill: whole forward batches until at least 300 rows
    sizes = [len(capture_rows(tiny_model, b, [H0], True).tokens)
             for b in token_batches(tiny_model, ref_store.dataset, 4, ref_store.n_tokens)]
    n_head = next(sum(sizes[: i + 1]) for i in range(len(sizes)) if sum(sizes[: i + 1]) >= 300)
    head = want[H0][:n_head].double()
    stats = stream.norm_stats(H0)
    torch.testing.assert_close(stats.mean, head.mean(0).float())
    assert stats.mean_sq_norm == pytest.approx(float((head * head).sum(1).mean()), rel=1e-6)
    full = list(stream.batches([H0, H1], batch_size=25))
    assert len(full) == len(want[H0]) // 25
    got = torch.cat([b[H1] for b in full])
    assert not torch.equal(got, want[H1][: len(got)])
    # every emitted row is a real row, none more often than it occurs; only the final partial batch is dropped
    assert not row_counts(got) - row_counts(want[H1])
    assert len(want[H1]) - len(got) < 25
    tail = list(stream.batches([H0, H1], batch_size=25, start_batch=9))
    assert all(torch.equal(a[h], b[h]) for a, b in zip(full[9:], tail) for h in (H0, H1))
    assert len(tail) == len(full) - 9


def test_caches_from_before_shuffling_still_match(ref_store, tmp_path):
    """A manifest without the shuffle fields (written before they existed) is the same unshuffled run."""
    out = tmp_path / "old"
    shutil.copytree(ref_store.out, out)
    storage = store_mod.Storage(str(out))
    manifest = storage.read_json(store_mod.MANIFEST)
    for field in ("shuffle_seed", "shuffle_buffer"):
        manifest["config"]["dataset"].pop(field)
    storage.write_json_atomic(store_mod.MANIFEST, manifest)
    cfg = CacheConfig(**{**ref_store.__dict__, "out": str(out)})
    assert cache_activations(cfg, progress=False) == str(out)  # complete, same run: nothing to do
    shuffled = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, shuffle_seed=3))
    with pytest.raises(ValueError, match="dataset.shuffle_seed: stored None, requested 3"):
        cache_activations(shuffled, progress=False)


def test_tensors_in_reads_what_safetensors_reads_without_copying():
    from activation_store.store import tensors_in

    gen = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(5, 3, generator=gen), "bf16": torch.randn(4, 2, generator=gen).bfloat16(),
               "f16": torch.randn(7, generator=gen).half(), "i64": torch.arange(6).view(2, 3),
               "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    blob = bytearray(safetensors.torch.save(tensors, metadata={"note": "x"}))
    got = tensors_in(blob)
    want = safetensors.torch.load(bytes(blob))
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t)
    before = bytes(blob)
    got["f32"][0, 0] = 99.0  # a view of the buffer, not a copy
    assert bytes(blob) != before and torch.equal(tensors_in(blob)["f32"], got["f32"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [[3, 5], [0, 4, 0], [0], [1000], [1, 1, 1, 1]])
@pytest.mark.parametrize("width", [1, 5, 768])
def test_safetensors_parts_join_to_the_bytes_safetensors_saves(dtype, rows, width):
    from activation_store.storage import byte_views
    from activation_store.store import safetensors_parts

    gen = torch.Generator().manual_seed(len(rows) * width)
    tensors = [torch.randn(r, width, generator=gen).to(dtype) for r in rows]  # (r, width) each
    parts = safetensors_parts("activations", tensors)
    assert b"".join(byte_views(parts)) == safetensors.torch.save({"activations": torch.cat(tensors)})
    before = [bytes(v) for v in byte_views(parts[1:])]
    for t in tensors:  # the parts are the tensors' own memory, not copies of it
        t.fill_(1)
    assert [bytes(v) for v in byte_views(parts[1:])] != before or not sum(rows)


def test_shards_are_written_without_a_copy_and_hold_what_safetensors_saves(ref_store, tiny_model, tmp_path,
                                                                            monkeypatch):
    """Activation files go from the forward's row blocks to disk uncopied (no safetensors.save, no concatenation),
    and are still, byte for byte and hash for hash, what saving the concatenated rows gives."""
    real, saved = safetensors.torch.save, []

    def save(tensors, *a, **k):
        saved.append(sorted(tensors))
        return real(tensors, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save", save)
    cfg = CacheConfig(**{**ref_store.__dict__, "out": str(tmp_path / "s")})
    timings = store_mod.CacheTimings()
    cache_activations(cfg, progress=False, model=tiny_model, timings=timings)
    assert saved and all(names == ["doc_ids", "positions", "tokens"] for names in saved)  # tokens files only
    assert shard_hashes(cfg.out) == shard_hashes(ref_store.out)
    manifest = store_mod.Storage(cfg.out).read_json("manifest.json")
    for shard in manifest["shards"]:
        for key, entry in shard["files"].items():
            data = (Path(cfg.out) / entry["path"]).read_bytes()
            assert len(data) == entry["bytes"] and storage_mod.sha256(data) == entry["sha256"]
            assert real(safetensors.torch.load(data)) == data
    # Every stage's time is accounted for, and every byte written.
    assert timings.batches == 16 and timings.bytes_written == sum(
        e["bytes"] for s in manifest["shards"] for e in s["files"].values())
    for name in ("total_s", "setup_s", "tokenize_s", "forward_s", "hash_s", "write_s", "sync_s", "commit_s"):
        assert getattr(timings, name) > 0, name
    assert timings.total_s >= timings.setup_s + timings.drain_s


@pytest.mark.parametrize("damage", ["header_length", "offsets", "dtype"])
def test_tensors_in_hands_malformed_files_to_safetensors(damage):
    from activation_store.store import tensors_in

    blob = bytearray(safetensors.torch.save({"a": torch.ones(4, 2)}))
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(bytes(blob[8:8 + n]))
    if damage == "header_length":
        blob[:8] = (len(blob) * 2).to_bytes(8, "little")
    else:
        if damage == "offsets":
            header["a"]["data_offsets"] = [0, 4 * 8 + 4]  # past the end of the data
        else:
            header["a"]["dtype"] = "F99"
        text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(text) == n
        blob[8:8 + n] = text
    with pytest.raises(safetensors.SafetensorError):  # safetensors' own diagnosis, never garbage tensors
        tensors_in(blob)


@pytest.mark.parametrize("edit", ["rewrite", "append", "same_size"])
def test_resume_refuses_an_edited_data_file(ref_store, tiny_model, docs, tmp_path, monkeypatch, edit):
    data = tmp_path / "docs.jsonl"
    shutil.copy(docs, data)
    cfg = CacheConfig(**{**ref_store.__dict__, "out": str(tmp_path / "s"),
                         "dataset": dataclasses.replace(ref_store.dataset, path=str(data))})
    crash_at(cfg, tiny_model, monkeypatch, "after_shard", 0)
    text = data.read_text()
    edited = {"rewrite": text.upper(), "append": text + json.dumps({"text": "x = 1\n"}) + "\n",
              "same_size": text.replace("def", "fed", 1)}[edit]
    data.write_text(edited)
    with pytest.raises(ValueError, match=rf"cannot resume .*dataset\.file_fingerprints\.{data}\.head_tail_sha256"):
        cache_activations(cfg, progress=False, model=tiny_model)
    data.write_text(text)  # the same bytes again: the resume goes on
    cache_activations(cfg, progress=False, model=tiny_model)
    assert len(shard_hashes(cfg.out)) == len(shard_hashes(ref_store.out))


def test_stores_from_before_data_fingerprints(ref_store, tiny_model, tmp_path):
    """A manifest without file fingerprints reads as before, and its finished store needs no data file; only a
    resume of an unfinished one is refused, as its files cannot be checked."""
    out = tmp_path / "old"
    shutil.copytree(ref_store.out, out)
    storage = store_mod.Storage(str(out))
    manifest = storage.read_json(store_mod.MANIFEST)
    del manifest["dataset"]["file_fingerprints"]
    gone = str(tmp_path / "moved_away.jsonl")
    manifest["config"]["dataset"]["path"] = manifest["dataset"]["path"] = gone
    manifest["dataset"]["files"] = [gone]
    storage.write_json_atomic(store_mod.MANIFEST, manifest)
    store = ActivationStore.open(str(out))  # verifies every shard
    assert store.n_rows == ActivationStore.open(ref_store.out).n_rows
    cfg = CacheConfig(**{**ref_store.__dict__, "out": str(out),
                         "dataset": dataclasses.replace(ref_store.dataset, path=gone)})
    assert cache_activations(cfg, progress=False, model=tiny_model) == str(out)  # complete: nothing to do
    manifest["complete"] = False
    manifest["config"]["dataset"]["path"] = manifest["dataset"]["path"] = ref_store.dataset.path
    manifest["dataset"]["files"] = [ref_store.dataset.path]
    storage.write_json_atomic(store_mod.MANIFEST, manifest)
    with pytest.raises(ValueError, match=r"dataset\.file_fingerprints: stored None.*started before sae-kit recorded"):
        cache_activations(CacheConfig(**{**ref_store.__dict__, "out": str(out)}), progress=False, model=tiny_model)
