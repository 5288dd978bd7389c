"""Recycled batch tensors: only the pool's own come back, and a gather into one equals a fresh gather."""
from __future__ import annotations

import pytest
import torch

from activation_store.buffers import MAX_FREE, BatchBuffers, gather_rows


def test_a_handed_back_tensor_is_taken_again_and_foreign_ones_never_are():
    pool = BatchBuffers()
    a = pool.take((4, 3), torch.float32)
    pool.give([a, a])  # twice: listed once
    pool.give([torch.empty(4, 3)])  # not the pool's: ignored
    assert pool.take((4, 3), torch.float32) is a
    fresh = pool.take((4, 3), torch.float32)
    assert fresh is not a
    assert pool.take((4, 3), torch.bfloat16).dtype == torch.bfloat16  # another key: a new tensor
    assert pool.take((5, 3), torch.float32).shape == (5, 3)


def test_the_free_list_is_bounded_and_forgets_dropped_tensors():
    pool = BatchBuffers()
    made = [pool.take((2, 2), torch.float32) for _ in range(MAX_FREE + 4)]
    pool.give(made)
    assert len(pool._free[((2, 2), torch.float32)]) == MAX_FREE
    del made
    pool._free.clear()  # every tensor dropped: the pool forgets them all
    assert not pool._made


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_gather_into_a_buffer_equals_a_fresh_gather(stored):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 7, generator=gen).to(stored)
    pool = BatchBuffers()
    for rows in (torch.randperm(50, generator=gen)[:16], slice(8, 24)):
        want = gather_rows(a, rows, torch.float32, None)
        for _ in range(2):  # the second time into the tensor handed back
            got = gather_rows(a, rows, torch.float32, pool)
            assert got.dtype == torch.float32 and torch.equal(got, want)
            assert got.data_ptr() != a.data_ptr()
            pool.give([got])
