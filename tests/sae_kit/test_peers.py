"""Folders we write load in the peers themselves with the same outputs: SAELens's `SAE.load_from_disk` and
sparsify's `SparseCoder.load_from_disk`. Runs where sae_lens / sparsify are importable (the benchmark venv of the
README: sae-lens 6.54.12, eai-sparsify 1.3.3), skips otherwise."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import sae_kit.sae  # noqa: F401
from sae_kit import SAE
from sae_kit.sae import SAEConfig, SparseCoder

ARCHS = ["relu", "topk", "abstopk", "jumprelu", "batchtopk", "gated"]
NORMS = ["none", "layer_norm", "constant_norm_rescale", "expected_average_only_in"]


def ours(arch: str, transcoder: bool, norm: str, centre: bool = True, d_out: int | None = None) -> SparseCoder:
    if arch not in SparseCoder.REGISTRY:
        pytest.skip(f"the {arch!r} architecture is not on this branch")
    torch.manual_seed(0)
    cfg = SAEConfig(architecture=arch, d_in=16, d_sae=48, k=5 if arch in ("topk", "abstopk", "batchtopk") else None,
                    transcoder=transcoder, d_out=(d_out or 12) if transcoder else None, dtype="float64",
                    skip_connection=transcoder and arch in ("relu", "jumprelu"), apply_b_dec_to_input=centre,
                    hook_point="blocks.2.hook_resid_post", target_hook_point="blocks.2.hook_mlp_out" if transcoder else None,
                    normalize_activations=norm, norm_scaling_factor=2.5 if norm.startswith("expected") else None)
    sae = SparseCoder.from_config(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        if arch == "jumprelu":
            sae.log_threshold.fill_(-1.5)
    if arch == "batchtopk":
        sae.threshold.fill_(0.1)
    return sae.eval()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("transcoder", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_loads_what_we_write(tmp_path: Path, arch: str, transcoder: bool, norm: str) -> None:
    lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (see README: the benchmark venv)")
    sae = ours(arch, transcoder, norm, centre=norm != "layer_norm")
    try:
        sae.save(tmp_path / "lens", format="saelens")
    except ValueError as err:
        assert transcoder and "SAELens has no" in str(err)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = lens.SAE.load_from_disk(str(tmp_path / "lens"))
    x = torch.randn(20, 16, dtype=torch.float64) * 2 + 0.5
    z = sae.encode(x)
    torch.testing.assert_close(theirs.encode(x), z, atol=1e-6, rtol=0)
    expected = sae.decode(z, x)
    got = theirs.forward(x) if sae.cfg.skip_connection else theirs.decode(theirs.encode(x))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", [{}, {"apply_b_dec_to_input": False}, {"transcoder": True, "d_out": 16},
                                     {"transcoder": True, "d_out": 16, "skip_connection": True},
                                     {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": 0.7}])
def test_sparsify_loads_what_we_write(tmp_path: Path, variant: dict) -> None:
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (see README: the benchmark venv)")
    torch.manual_seed(0)
    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=16, d_sae=48, k=5, dtype="float64", **variant))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    sae.eval().save(tmp_path / "layers.0", format="sparsify")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.0")
    x = torch.randn(20, 16, dtype=torch.float64)
    enc = theirs.encode(x)
    z = torch.zeros(20, 48, dtype=torch.float64).scatter(1, enc.top_indices, enc.top_acts)
    torch.testing.assert_close(z, sae.encode(x), atol=1e-6, rtol=0)
    got = theirs.decode(enc.top_acts, enc.top_indices)
    if theirs.W_skip is not None:
        got = got + x @ theirs.W_skip.mT  # sparsify's forward adds the skip path after decode
    torch.testing.assert_close(got, sae.decode(sae.encode(x), x), atol=1e-6, rtol=0)
    # and back: the folder reads into the same coder
    torch.testing.assert_close(SAE.load(tmp_path / "layers.0").encode(x), sae.encode(x), atol=1e-6, rtol=0)
