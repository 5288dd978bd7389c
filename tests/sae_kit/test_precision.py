"""The training precision regimes: what `dtype` changes, how far bf16 selection is from fp32, and the CUDA path."""
from __future__ import annotations

import pytest
import torch

from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.sae.topk import TopKSAE
from sae_kit.train import TensorSource, TrainConfig, train
from sae_kit.train.loop import encoder_precision
from tests.sae_kit.test_feed import SHIPPED

HOOK = "h"


def _trained_like(arch: str = "topk", d_in: int = 64, d_sae: int = 1024, k: int = 16, seed: int = 0):
    """A coder whose encoder rows are data directions, so its pre-activations have the spread of a trained one."""
    gen = torch.Generator().manual_seed(seed)
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k))
    feats = torch.randn(d_sae, d_in, generator=gen)
    feats /= feats.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(feats)
        sae.W_enc.copy_(feats.T)
        sae.b_enc.copy_(-0.05 * torch.rand(d_sae, generator=gen))
    codes = torch.zeros(4096, d_sae).scatter_(1, torch.randint(0, d_sae, (4096, 8), generator=gen),
                                              torch.rand(4096, 8, generator=gen) + 0.2)
    x = codes @ feats + 0.05 * torch.randn(4096, d_in, generator=gen)  # (N, d_in)
    return sae, x


def bf16_agreement(sae: TopKSAE, x: torch.Tensor) -> tuple[float, float, float]:
    """(share of equal top-k indices, FVU with bf16 selection, FVU with fp32 selection) of one training forward."""
    with torch.no_grad():
        fp32 = sae(x)
        with sae.training_precision(torch.bfloat16):
            bf16 = sae(x)
    a, b = fp32.latent_indices, bf16.latent_indices
    same = torch.stack([torch.isin(b[i], a[i]).float().mean() for i in range(len(a))]).mean()
    return float(same), float(bf16.fvu), float(fp32.fvu)


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
def test_bf16_selection_agrees_with_fp32(arch):
    """bf16 operands (emulated on CPU by torch's bf16 matmul) pick nearly the fp32 top k, at nearly the same FVU."""
    sae, x = _trained_like(arch)
    same, fvu_bf16, fvu_fp32 = bf16_agreement(sae, x)
    assert 0.97 < same < 1.0  # not all equal: the regime really changed the product
    assert abs(fvu_bf16 - fvu_fp32) < 0.01 * fvu_fp32


def test_dtype_changes_the_kernels_that_run(tmp_path, monkeypatch):
    """dtype=bfloat16 runs the encoder product on bf16 operands; float32 never does; auto follows the device."""
    seen = []
    real = torch.addmm

    def spy(*args, **kwargs):
        seen.append(args[1].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", spy)
    x = torch.randn(2048, 16)
    for dtype in ("bfloat16", "float32"):
        seen.clear()
        cfg = TrainConfig(hook_points=HOOK, k=4, d_sae=64, n_tokens=1024, batch_size=256, out=str(tmp_path / dtype),
                          dtype=dtype)
        path = train(cfg, TensorSource({HOOK: x}), progress=False)
        assert (torch.bfloat16 in seen) == (dtype == "bfloat16")
        assert SparseCoder.load(path).cfg.metadata["encoder_precision"] == dtype
    assert encoder_precision("auto", torch.device("cpu")) is None
    assert encoder_precision("auto", torch.device("cuda")) is torch.bfloat16
    assert encoder_precision("float32", torch.device("cuda")) is None


def test_dense_architectures_autocast_in_bf16():
    """JumpReLU and ReLU run their dense encoder under autocast: the product comes out bf16-rounded (b_enc is 0)."""
    x = torch.randn(8, 16)
    for arch, extra in (("jumprelu", {}), ("relu", {"sparsity_coefficient": 1e-3})):
        sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=16, d_sae=64, **extra))
        with sae.training_precision(torch.bfloat16):
            low = sae.pre_acts(x)
        full = sae.pre_acts(x)
        assert torch.equal(low.to(torch.bfloat16).float(), low.float()) and not torch.equal(low.float(), full)
        assert not torch.equal(full.to(torch.bfloat16).float(), full)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "abstopk", "jumprelu", "relu"])
def test_every_architecture_trains_in_bf16_as_well_as_in_fp32(tmp_path, arch):
    """fp32 master weights either way; the bf16 run ends within a few percent of the fp32 run's FVU."""
    from tests.sae_kit.test_train import synthetic

    extra = {"sparsity_coefficient": 1e-3} if arch in ("jumprelu", "relu") else {}
    x, _ = synthetic(n=4096)
    fvu = {}
    for dtype in ("float32", "bfloat16"):
        cfg = TrainConfig(hook_points=HOOK, architecture=arch, k=3, d_sae=128, n_tokens=4096 * 4, batch_size=256,
                          lr=3e-3, out=str(tmp_path / dtype), dtype=dtype, **extra)
        sae = SparseCoder.load(train(cfg, TensorSource({HOOK: x}), progress=False))
        assert all(p.dtype == torch.float32 for p in sae.parameters())
        fvu[dtype] = sae.cfg.metadata["final_metrics"]["fvu"]
    assert fvu["bfloat16"] < 1.1 * fvu["float32"] + 0.005, fvu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["topk", "abstopk"])
def test_cuda_selection_matches_the_cpu_path(arch):
    """The CUDA path (plain torch ops) against the CPU fast path (native top-k): the same fp32 selection and step."""
    sae, x = _trained_like(arch)
    gpu = SparseCoder.from_config(sae.cfg, device="cuda")
    gpu.load_state_dict(sae.state_dict())
    cpu_out, gpu_out = sae(x), gpu(x.cuda())
    assert torch.equal(cpu_out.latent_indices, gpu_out.latent_indices.cpu())
    torch.testing.assert_close(gpu_out.sae_out.cpu(), cpu_out.sae_out, atol=1e-4, rtol=1e-4)
    cpu_out.loss.backward()
    gpu_out.loss.backward()
    for (name, p), q in zip(sae.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-4, rtol=1e-3, msg=name)
    same, fvu_bf16, fvu_fp32 = bf16_agreement(gpu, x.cuda())
    assert same > 0.97 and abs(fvu_bf16 - fvu_fp32) < 0.01 * fvu_fp32


@pytest.mark.parametrize("arch", SHIPPED)
def test_follows_training_precision_says_what_the_products_do(arch):
    """An architecture that claims to follow `training_precision` runs a matrix product on bf16 operands under it;
    one that does not never does (the saved `encoder_precision` is read off this claim)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    class Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bf16 = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in products and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
                self.bf16 = True
            return func(*args, **(kwargs or {}))

    cls = SparseCoder.REGISTRY[arch]
    extra = {"k": 4} if issubclass(cls, TopKSAE) else {"sparsity_coefficient": 1e-3}
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=16, d_sae=64, **extra))
    x = torch.randn(256, 16)
    with Spy() as spy, sae.training_precision(torch.bfloat16):
        sae(x, sparsity_coefficient=1e-3).loss.backward()
    assert spy.bf16 == cls.follows_training_precision


def test_saved_encoder_precision_is_what_ran(tmp_path):
    """Kron keeps its encoder product in fp32 whatever --dtype asks: its metadata says float32, not bfloat16."""
    x = torch.randn(2048, 16)
    for arch, want in (("kron", "float32"), ("topk", "bfloat16")):
        cfg = TrainConfig(hook_points=HOOK, architecture=arch, k=4, d_sae=64, n_tokens=512, batch_size=256,
                          out=str(tmp_path / arch), dtype="bfloat16")
        path = train(cfg, TensorSource({HOOK: x}), progress=False)
        assert SparseCoder.load(path).cfg.metadata["encoder_precision"] == want
