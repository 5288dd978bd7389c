"""The trainer's update: Adam with clipping folded in, the decoder-direction fix, and gradients it adopts."""
from __future__ import annotations

import pytest
import torch

from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.sae.topk import TopKSAE
from sae_kit.train import TensorSource, TrainConfig, train
from sae_kit.train.optim import grad_norm, grad_scale, masked_step


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((40, 8), (8,), (3, 5))]


def _grads(params: list[torch.nn.Parameter], scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e6])
def test_the_update_with_clipping_folded_in_is_torchs_clip_then_adam(fused, max_norm):
    ours, ref = _params(), _params()
    opt = torch.optim.Adam(ours, lr=1e-2, fused=fused)
    ref_opt = torch.optim.Adam(ref, lr=1e-2)
    for step in range(4):
        _grads(ours, 3.0, step)
        _grads(ref, 3.0, step)
        norm = grad_norm(ours)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm if max_norm > 0 else float("inf"))
        torch.testing.assert_close(norm, ref_norm)
        masked_step(opt, torch.tensor(False), grad_scale(norm, max_norm))
        ref_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)  # the clipped gradient, as torch's
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # nothing left for the next step
    if 0 < max_norm < 1:
        assert grad_scale(norm, max_norm) > 1  # the clipping was exercised


@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_update_leaves_parameters_and_state_alone(fused):
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-2, fused=fused)
    _grads(params, 1.0, 0)
    masked_step(opt, torch.tensor(False), grad_scale(grad_norm(params), 0.5))
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    _grads(params, float("nan"), 1)
    norm = grad_norm(params)
    masked_step(opt, ~torch.isfinite(norm), grad_scale(norm, 0.5))
    for p, b, s in zip(params, before, state):
        assert torch.equal(p, b)
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v), k


def test_gradient_parallel_to_decoder_rows_is_removed_for_rows_of_any_norm():
    torch.manual_seed(0)
    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=16, d_sae=32, k=4))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1) * 3 + 0.1)  # rows far from unit norm
    g = torch.randn(32, 16)
    sae.W_dec.grad = g.clone()
    sae.remove_gradient_parallel_to_decoder_directions_()
    w = sae.W_dec.detach()
    unit = w / w.norm(dim=1, keepdim=True)
    expected = g - (g * unit).sum(1, keepdim=True) * unit
    torch.testing.assert_close(sae.W_dec.grad, expected, rtol=1e-5, atol=1e-6)
    assert (sae.W_dec.grad * unit).sum(1).abs().max() < 1e-5
    assert (sae.W_dec.grad - g).abs().max() > 0.1  # something was removed


def test_a_parameter_unused_in_a_step_still_moves_once_it_has_adam_state(monkeypatch, tmp_path):
    """Gradients start each step as None (autograd adopts fresh ones); a parameter the loss skipped this step gets a
    zero gradient once Adam has state for it, so its momentum still moves it, as when gradients were zeroed."""
    monkeypatch.setattr(SparseCoder, "REGISTRY", dict(SparseCoder.REGISTRY))  # forgotten after the test
    seen: list[float] = []  # the extra parameter's value at the start of each training step

    class UsedAtStepTwo(TopKSAE):
        architecture = "used_at_step_two_for_this_test"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.gain = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, target=None, **loss_kwargs):
            out = super().forward(x, target=target, **loss_kwargs)
            if not torch.is_grad_enabled():  # not a training step
                return out
            seen.append(float(self.gain.detach()))
            return out._replace(loss=out.loss + (self.gain - 3.0) ** 2) if len(seen) == 2 else out

    cfg = TrainConfig(hook_points="h", architecture=UsedAtStepTwo.architecture, k=2, d_sae=16, batch_size=256,
                      n_tokens=256 * 5, lr=1e-2, out=str(tmp_path), log_every=100)
    train(cfg, TensorSource({"h": torch.randn(2048, 8)}), progress=False)
    assert len(seen) == 5
    assert seen[1] == seen[0]  # step 1: no gradient and no Adam state, untouched
    assert seen[2] > seen[1]  # step 2: pulled towards 3
    assert seen[3] > seen[2] and seen[4] > seen[3], seen  # steps 3 and 4: unused, moved by momentum alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_cuda_training_matches_the_cpu_training(arch, tmp_path):
    """The whole update on CUDA (fused Adam with the clip as its grad_scale, the decoder fix, JumpReLU's fused
    backward, BatchTopK's sorted cut) against the same run on CPU, both with fp32 encoder products. The products'
    summation orders differ, so a near-tie may select differently on one row: that moves a latent's weights by about
    lr / (its rows in the batch), inside the tolerance; a wrong update moves them by about lr."""
    torch.manual_seed(0)
    x = torch.randn(1024, 32) * torch.linspace(0.5, 1.5, 32)  # E‖x‖² ≈ d_in: the saved weights are at training scale
    extra = {"sparsity_coefficient": 1e-3} if arch == "jumprelu" else {"k": 4}
    weights = []
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(hook_points="h", architecture=arch, d_sae=64, batch_size=256, n_tokens=256 * 4,
                          lr=3e-3, grad_clip=0.05, out=str(tmp_path / device), device=device, dtype="float32",
                          log_every=100, **extra)
        sae = SparseCoder.load(train(cfg, TensorSource({"h": x}), progress=False))
        weights.append({k: v.float() for k, v in sae.state_dict().items()})
    cpu, cuda = weights
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1e-3, atol=5e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
