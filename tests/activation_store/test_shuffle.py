"""The mixing buffer yields exactly the batches its plan describes, whatever the buffer and batch sizes."""
from __future__ import annotations

import itertools

import pytest
import torch

from activation_store.shuffle import mixed_batches, shard_order

H, G = "a", "b"


def _shards(sizes: list[int], dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(len(sizes))
    return [{H: torch.randn(n, 5, generator=gen).to(dtype), G: torch.randn(n, 3, generator=gen).to(dtype)}
            for n in sizes]


def _planned(shards, batch_size: int, shuffle: bool, seed: int, epochs: int, buffer_rows: int):
    """The module docstring's plan on global row ids, each batch read from the concatenation of all shards."""
    offsets = [0, *itertools.accumulate(len(s[H]) for s in shards)]
    whole = {h: torch.cat([s[h] for s in shards]) for h in (H, G)}
    order = shard_order(len(shards), epochs, shuffle, seed)
    epoch_end = {(e + 1) * len(shards) - 1 for e in range(epochs)}
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    ids, out = torch.empty(0, dtype=torch.long), []
    for pos, s in enumerate(order):
        ids = torch.cat([ids, torch.arange(offsets[s], offsets[s + 1])])
        flush = pos in epoch_end
        if shuffle and not flush and len(ids) < buffer_rows:
            continue
        if shuffle:
            ids = ids[torch.randperm(len(ids), generator=gen)]
        n_emit = len(ids) // batch_size if (flush or not shuffle) else (len(ids) // 2) // batch_size
        out += [{h: whole[h][ids[b * batch_size:(b + 1) * batch_size]] for h in (H, G)} for b in range(n_emit)]
        ids = ids[n_emit * batch_size:]
    return out


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("batch_size,buffer_rows", [(16, 100), (16, 1000), (64, 50), (7, 23)])
@pytest.mark.parametrize("prefetch", [0, 3])
def test_batches_follow_the_plan(shuffle, batch_size, buffer_rows, prefetch):
    shards = _shards([40, 97, 13, 60, 41, 5])
    want = _planned(shards, batch_size, shuffle, seed=3, epochs=3, buffer_rows=buffer_rows)
    # All batches held at once: a batch that aliased a reused buffer would be overwritten by the time it is compared.
    got = list(mixed_batches([len(s[H]) for s in shards], lambda i: shards[i], batch_size, shuffle=shuffle, seed=3,
                             epochs=3, buffer_rows=buffer_rows, prefetch=prefetch, workers=2))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert all(torch.equal(g[h], w[h]) for h in (H, G))
    for start in (1, len(want) // 2, len(want) - 1):  # a resumed reader goes live mid-plan
        tail = list(mixed_batches([len(s[H]) for s in shards], lambda i: shards[i], batch_size, shuffle=shuffle,
                                  seed=3, epochs=3, start_batch=start, buffer_rows=buffer_rows, prefetch=prefetch))
        assert len(tail) == len(want) - start
        assert all(torch.equal(g[h], w[h]) for g, w in zip(tail, want[start:]) for h in (H, G))


def test_stored_dtype_is_converted_and_batches_are_their_own():
    shards = _shards([30, 50, 20], dtype=torch.bfloat16)
    got = list(mixed_batches([30, 50, 20], lambda i: shards[i], 8, seed=1, epochs=2, buffer_rows=40))
    want = _planned(shards, 8, True, seed=1, epochs=2, buffer_rows=40)
    assert all(g[H].dtype == torch.float32 and torch.equal(g[H], w[H].float()) for g, w in zip(got, want))
    got[0][H].fill_(7.0)  # writing into one batch leaves the others (and the source shards) alone
    assert all(not torch.equal(g[H], got[0][H]) for g in got[1:])
    assert not (torch.cat([s[H] for s in shards]).float() == 7.0).all(1).any()


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_batches_gathered_into_handed_back_tensors_follow_the_plan(stored):
    """A consumer that hands each batch back once done with it gets the plan's batches, gathered into a few reused
    tensors (their number bounded by how many batches it holds at once, here one)."""
    from activation_store.buffers import BatchBuffers

    shards = _shards([40, 97, 13, 60, 41, 5], dtype=stored)
    want = _planned(shards, 16, True, seed=3, epochs=3, buffer_rows=100)
    pool = BatchBuffers()
    seen, n = set(), 0
    for start in (0, len(want) // 2):  # also going live mid-plan (a resumed reader)
        for g, w in zip(mixed_batches([len(s[H]) for s in shards], lambda i: shards[i], 16, seed=3, epochs=3,
                                      buffer_rows=100, start_batch=start, prefetch=2, buffers=pool), want[start:]):
            assert all(g[h].dtype == torch.float32 and torch.equal(g[h], w[h].float()) for h in (H, G))
            seen |= {g[h].data_ptr() for h in (H, G)}
            n += 1
            pool.give(g.values())
    assert n == len(want) + len(want) - len(want) // 2
    assert len(seen) == 2  # one tensor per hook point, refilled every batch
