"""Records read latents through `encode_selected`: the sparse route must agree with the dense code for every
research architecture (Matching Pursuit pads atoms picked twice, AdaptiveK and Gated give rows different counts)."""
from __future__ import annotations

import pytest
import torch

from autointerp.records import encode_selected
from sae_kit.sae import SAEConfig, SparseCoder


@pytest.mark.parametrize("arch", ["matryoshka_batchtopk", "gated", "matching_pursuit", "kron", "adaptivek"])
def test_sparse_and_dense_encoding_agree(arch):
    torch.manual_seed(0)
    kw = {"sparsity_coefficient": 0.1} if arch == "gated" else {"k": 4}
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=16, d_sae=64, **kw)).eval()
    if arch == "adaptivek":
        with torch.no_grad():
            sae.probe_weight.normal_(0, 3)  # rows get different k
    x = torch.randn(50, 16)
    latents = torch.tensor([3, 17, 40, 63])
    column_of = torch.full((64,), -1)
    column_of[latents] = torch.arange(4)
    with torch.no_grad():
        dense = sae.encode(x)[:, latents]
        assert (dense != 0).any()
        torch.testing.assert_close(encode_selected(sae, x, latents, column_of), dense)
