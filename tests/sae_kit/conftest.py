"""Fixtures shared by the sae_kit tests."""
from __future__ import annotations

import pytest

from sae_kit.sae import native


@pytest.fixture(scope="module")
def lib():
    """The native kernels' library; the test is skipped where it cannot be built (no C compiler)."""
    if native.library() is None:
        pytest.skip("no C compiler here: the native kernels are not built (the torch paths are tested elsewhere)")
    return native.library()
