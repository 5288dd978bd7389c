"""Fixtures of the sae_kit tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=[1, 2, 4], ids=lambda n: f"{n}thr")
def threads(request):
    """Run a test at 1, 2 and 4 torch threads (the native kernels use as many), restoring the count after.

    tests/conftest.py pins one thread for the tiny models; the kernels' OpenMP regions (rows split across threads,
    the counting sort, per-thread scratch) only run in parallel with more.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
