"""The CUDA-only branches of the training step, run on any machine with fake CUDA tensors.

torch's `FakeTensorMode` propagates shapes, dtypes and devices without data, so tensors can sit on "cuda" on a
CPU-only build and every branch taken for CUDA tensors runs (`xc.is_cuda`: the chunked torch top-k, the stable-sort
sparse pattern, the non-native `topk_indices`). A CPU tensor mixed into such a branch raises, and so does reading a
value back to the host (on a GPU, a sync that stalls the step). Three parts of a CPU-only torch need a real GPU and
are worked around or left to the CUDA tests: Python indexing and `contiguous` take a CUDA device guard (`_Indexing`
below replays them as aten calls), autograd's graph does too (forwards run without grad, and the sparse
backward's pieces are called directly), and CSR tensors cannot be faked (`torch.sparse.sampled_addmm` is checked
against the dense reference on a GPU in test_kernels.py).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.sae import kernels as K

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)


class HostRead(AssertionError):
    """A CUDA tensor's value was read on the host inside a step."""


_READS = {torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
          torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy}


def _getitem(t: torch.Tensor, index) -> torch.Tensor:
    """t[index] for basic and integer-tensor indexing, as aten calls (no device guard)."""
    parts = index if isinstance(index, tuple) else (index,)
    out, dim, gathered = t, 0, {}
    for p in parts:
        if p is Ellipsis:
            dim = t.dim() - sum(1 for q in parts if q is not None and q is not Ellipsis) + dim
        elif p is None:
            out, dim = aten.unsqueeze.default(out, dim), dim + 1
        elif isinstance(p, slice):
            step = p.step or 1
            out = aten.slice.Tensor(out, dim, p.start or 0, p.stop if p.stop is not None else 2**62, step)
            dim += 1
        elif isinstance(p, int):
            out = aten.select.int(out, dim, p)
        elif isinstance(p, torch.Tensor) and p.dtype != torch.bool:
            gathered[dim], dim = p, dim + 1
        else:
            raise HostRead(f"indexing by {type(p).__name__} sizes the result by the data")
    if gathered:
        out = aten.index.Tensor(out, [gathered.get(d) for d in range(max(gathered) + 1)])
    return out


class _Indexing(TorchFunctionMode):
    """Python indexing and `contiguous` replayed as aten calls, and host reads of tensor values turned into
    HostRead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            raise HostRead(f"{func.__name__} reads a CUDA tensor back to the host")
        if func is torch.Tensor.__getitem__:
            return _getitem(*args)
        if func is torch.Tensor.__setitem__:
            t, index, value = args
            view = _getitem(t, index)
            return aten.copy_.default(view, value.expand_as(view)) if isinstance(value, torch.Tensor) else \
                aten.fill_.Scalar(view, value)
        if func is torch.Tensor.contiguous:  # its binding takes a device guard too
            t = args[0]
            return t if t.is_contiguous() else aten.clone.default(t, memory_format=torch.contiguous_format)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fake_cuda():
    """Fake CUDA tensors for the test's body, without grad; skipped where torch cannot fake them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    try:
        with mode, _Indexing():
            probe = torch.zeros(4, 4, device="cuda")
            assert probe[1:3, 0].device == CUDA
    except Exception as err:  # noqa: BLE001 (a torch without this private API: nothing to check here)
        pytest.skip(f"FakeTensorMode cannot make CUDA tensors here: {err}")
    with mode, _Indexing(), torch.no_grad():
        yield


BATCH_CUT = pytest.mark.xfail(raises=HostRead, strict=True, reason="BatchTopK's batch cut reads the widest row's "
                              "count back to the host, its one wait per step (sae_kit/sae/batchtopk.py)")


@pytest.mark.parametrize("arch", ["topk", "abstopk", "kron", "adaptivek", "matching_pursuit",
                                  pytest.param("batchtopk", marks=BATCH_CUT),
                                  pytest.param("matryoshka_batchtopk", marks=BATCH_CUT)])
@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_training_forward_on_cuda_stays_there_and_never_reads_back(fake_cuda, arch, precision):
    """The training forward (AuxK on) with every tensor on the GPU: outputs on the GPU in the parameters' dtype,
    integer indices, and no value read back to the host (chunked encoder, top-k and sparse pattern included)."""
    d_in, d_sae, n = 64, 1024, 512
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=8), device="cuda")
    x = torch.randn(n, d_in, device="cuda")
    dead = torch.arange(0, d_sae, 5, device="cuda")
    with sae.training_precision(precision):
        out = sae(x, dead_latents=dead)
    for name in out._fields:
        value = getattr(out, name)
        assert value is not None and value.device == CUDA, name
    assert out.sae_out.shape == (n, d_in) and out.sae_out.dtype == torch.float32
    assert out.latent_acts.dtype == torch.float32 and out.latent_indices.dtype == torch.int64
    assert out.latent_acts.shape == out.latent_indices.shape and out.latent_acts.shape[0] == n


def test_cuda_encoder_chunks_and_selection(fake_cuda, monkeypatch):
    """Past CUDA_CHUNK_ELEMENTS the CUDA encoder runs in row chunks: bf16 products, fp32 values, ascending int64
    indices for every row, the AuxK slots alongside."""
    import sae_kit.sae.topk as topk_module

    monkeypatch.setattr(topk_module, "CUDA_CHUNK_ELEMENTS", 256 * 100)  # 100 rows a chunk, the last one short
    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=32, d_sae=256, k=4, k_aux=6), device="cuda")
    seen = []
    real = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: seen.append((a[1].shape[0], a[1].dtype)) or real(*a, **k))
    with sae.training_precision(torch.bfloat16):
        sel = sae.row_topk(torch.randn(250, 32, device="cuda"), torch.arange(0, 256, 7, device="cuda"), 4)
    assert seen == [(100, torch.bfloat16), (100, torch.bfloat16), (50, torch.bfloat16)]
    assert sel.values.shape == sel.indices.shape == (250, 4) and sel.values.dtype == torch.float32
    assert sel.aux_values.shape == sel.aux_indices.shape == (250, 6) and sel.aux_values.dtype == torch.float32
    assert {t.device for t in sel if t is not None} == {CUDA}


def test_sparse_pattern_and_backward_pieces_on_cuda(fake_cuda):
    """The stable-sort pattern keeps the CSR pointers in int32 on the GPU, and the sparse encoder backward and the
    decoder's weight gradient come out on the GPU in the parameters' layouts (W_enc latent-major)."""
    n, k, d_in, d_sae = 512, 8, 64, 1024
    idx = torch.randint(0, d_sae, (n, k), device="cuda").sort(dim=1).values
    p = K.sparse_pattern(idx, d_sae)
    for name in ("row_ptr", "cols", "latent_ptr", "slot_token"):
        t = getattr(p, name)
        assert t.device == CUDA and t.dtype == torch.int32, name
    assert p.by_latent.device == CUDA and p.latent_ptr.shape == (d_sae + 1,)
    W_enc = torch.randn(d_sae, d_in, device="cuda").T  # (d_in, d_sae), latent-major like the parameter
    W_dec = torch.randn(d_sae, d_in, device="cuda")
    x, b_dec, grad = torch.randn(n, d_in, device="cuda"), torch.randn(d_in, device="cuda"), torch.randn(n, k, device="cuda")
    ctx = SimpleNamespace(saved_tensors=(x, W_enc, b_dec), p=p, needs_input_grad=(False, True, True, True, True, False))
    _, gx, gw, gbe, gbd, _ = K._GatherPreActs.backward(ctx, grad)
    assert gx.shape == x.shape and gw.shape == W_enc.shape and gw.stride() == W_enc.stride()
    assert gbe.shape == (d_sae,) and gbd.shape == (d_in,)
    ctx = SimpleNamespace(saved_tensors=(grad, W_dec), p=p, needs_input_grad=(False, True, False))
    _, gw_dec, _ = K._DecodeAtPattern.backward(ctx, torch.randn(n, d_in, device="cuda"))
    assert gw_dec.shape == W_dec.shape
    assert {t.device for t in (gx, gw, gbe, gbd, gw_dec)} == {CUDA}
    assert {t.dtype for t in (gx, gw, gbe, gbd, gw_dec)} == {torch.float32}


@pytest.mark.parametrize("by_magnitude", [False, True])
def test_two_stage_topk_on_cuda(fake_cuda, by_magnitude):
    """`topk_indices` without the native kernels (always so on CUDA), through its two-stage grouped path as for
    inference and AuxK on wide rows: (N, k) int64 indices on the GPU."""
    d, k = 4096, 16
    assert K._group_count(d, k) is not None  # the grouped path, not one plain topk
    idx = K.topk_indices(torch.randn(300, d, device="cuda"), k, by_magnitude=by_magnitude)
    assert idx.shape == (300, k) and idx.dtype == torch.int64 and idx.device == CUDA
