"""The trainer: feature recovery, exact resume, normalisation folding, NaN handling, bad input, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.train import TensorSource, TrainConfig, train
from sae_kit.train.geometric_median import geometric_median
from sae_kit.train.schedule import lr_at, sparsity_at

HOOK = "h"


def synthetic(n: int = 16384, d: int = 32, n_features: int = 64, active: int = 3, seed: int = 0, scale: float = 7.0):
    """Rows that are sparse non-negative combinations of known unit directions, scaled away from unit norm."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=gen)
    features /= features.norm(dim=1, keepdim=True)
    codes = torch.zeros(n, n_features)
    idx = torch.stack([torch.randperm(n_features, generator=gen)[:active] for _ in range(n)])
    codes.scatter_(1, idx, torch.rand(n, active, generator=gen) + 0.5)
    return scale * codes @ features, features


def cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(hook_point=HOOK, architecture="topk", k=3, d_sae=128, n_tokens=16384 * 6, batch_size=256,
                lr=3e-3, out=str(tmp_path), log_every=5, dead_tokens_threshold=20_000)
    base.update(kw)
    return TrainConfig(**base)


def test_recovers_true_features(tmp_path):
    x, features = synthetic()
    path = train(cfg(tmp_path), TensorSource({HOOK: x}), progress=False)
    sae = SparseCoder.load(path)
    dirs = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    max_cos = (features @ dirs.T).max(dim=1).values
    assert max_cos.mean() > 0.9, max_cos.mean()
    # the saved SAE takes raw (unscaled) activations: its reconstruction is good on them
    with torch.no_grad():
        recon = sae.decode(sae.encode(x))
    fvu = (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu < 0.15
    meta = json.loads((path / "cfg.json").read_text())["metadata"]
    assert meta["tokens_seen"] == 16384 * 6 // 256 * 256 and meta["input_scale_folded"] != 1.0


def test_resume_reproduces_uninterrupted_run(tmp_path):
    x, _ = synthetic(n=4096)
    source = TensorSource({HOOK: x})
    full = train(cfg(tmp_path / "a", n_tokens=4096 * 3), source, progress=False)
    # Interrupt: the same run with checkpoints, stopped by a source that dies part-way.
    interrupted = cfg(tmp_path / "b", n_tokens=4096 * 3, checkpoint_every=256 * 20)

    class Dying(TensorSource):
        def batches(self, *a, **k):
            for i, b in enumerate(super().batches(*a, **k)):
                if i == 27:
                    raise KeyboardInterrupt
                yield b

    with pytest.raises(KeyboardInterrupt):
        train(interrupted, Dying({HOOK: x}), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(interrupted, source, progress=False)
    resumed = train(interrupted, source, resume=True, progress=False)
    a, b = SparseCoder.load(full), SparseCoder.load(resumed)
    for name, p in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], p, rtol=1e-5, atol=1e-6)
    la = [json.loads(s) for s in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(s) for s in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5)


def test_resume_with_different_config_is_refused(tmp_path):
    x, _ = synthetic(n=2048)

    class Dying(TensorSource):
        def batches(self, *a, **k):
            for i, b in enumerate(super().batches(*a, **k)):
                if i == 6:
                    raise KeyboardInterrupt
                yield b

    c = cfg(tmp_path, n_tokens=2048 * 2, checkpoint_every=256 * 4)
    with pytest.raises(KeyboardInterrupt):
        train(c, Dying({HOOK: x}), progress=False)
    ckpts = sorted((tmp_path / "topk" / "checkpoints").glob("*.pt"))
    with pytest.raises(ValueError, match="lr"):
        train(c.replace(lr=1e-2), TensorSource({HOOK: x}), resume=True, progress=False)
    assert sorted((tmp_path / "topk" / "checkpoints").glob("*.pt")) == ckpts  # untouched


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path):
    x, _ = synthetic(n=2048)
    x[1500:] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step \d+ \(batch index \d+\).*saved"):
        train(cfg(tmp_path, n_tokens=2048, lr=1e-3), TensorSource({HOOK: x}), progress=False)
    assert list((tmp_path / "topk" / "checkpoints").glob("*.pt"))


def test_transcoder_learns_a_sparse_map(tmp_path):
    x, features = synthetic()
    gen = torch.Generator().manual_seed(1)
    y = x @ torch.randn(32, 24, generator=gen) / 4  # a linear "MLP" into a different width
    path = train(cfg(tmp_path, transcoder=True, target_hook_point="y"),
                 TensorSource({HOOK: x, "y": y}), progress=False)
    sae = SparseCoder.load(path)
    assert sae.cfg.transcoder and sae.W_dec.shape == (128, 24)
    with torch.no_grad():
        pred = sae.decode(sae.encode(x))
    assert (y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum() < 0.35  # the mean predictor scores 1


@pytest.mark.parametrize("bad,match", [
    (dict(k=0), "k must be positive"), (dict(batch_size=0), "batch_size"), (dict(architecture="gated"), "gated"),
    (dict(n_tokens=-5), "n_tokens"), (dict(transcoder=True), "target_hook_point"),
])
def test_bad_config(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        cfg(tmp_path, **bad)


def test_k_not_below_d_sae_is_refused(tmp_path):
    x, _ = synthetic(n=1024)
    with pytest.raises(ValueError, match="k=128"):
        train(cfg(tmp_path, k=128), TensorSource({HOOK: x}), progress=False)


def test_finished_run_is_not_overwritten(tmp_path):
    x, _ = synthetic(n=1024)
    train(cfg(tmp_path, n_tokens=1024), TensorSource({HOOK: x}), progress=False)
    with pytest.raises(FileExistsError, match="already holds"):
        train(cfg(tmp_path, n_tokens=1024), TensorSource({HOOK: x}), progress=False)


def test_schedules_are_pure_functions_of_the_step():
    assert lr_at(0, 100, 1.0, 10, 0.8) == pytest.approx(0.1)
    assert lr_at(50, 100, 1.0, 10, 0.8) == 1.0
    assert lr_at(90, 100, 1.0, 10, 0.8) == pytest.approx(0.5)
    assert sparsity_at(0, 100, 2.0) == pytest.approx(0.4) and sparsity_at(50, 100, 2.0) == 2.0


def test_geometric_median_resists_outliers():
    pts = torch.cat([torch.zeros(50, 3), torch.full((5, 3), 1000.0)])
    assert geometric_median(pts).norm() < 1.0
    assert pts.mean(0).norm() > 50


def test_abstopk_keeps_signed_values():
    sae = SparseCoder.from_config(SAEConfig(architecture="abstopk", d_in=8, d_sae=16, k=2))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 3], sae.W_enc[1, 5] = -1.0, 1.0
    z = sae.encode(torch.tensor([[4.0, 2.0] + [0.0] * 6]))
    assert z[0, 3] == -4.0 and z[0, 5] == 2.0 and (z != 0).sum() == 2


def test_cli_trains_from_a_cache(tmp_path, tiny_gpt2_path):
    from sae_kit.cli import main

    acts = tmp_path / "acts"
    assert main(["cache", "--model", str(tiny_gpt2_path), "--hook", "blocks.1.hook_resid_post", "--tokens", "4096",
                 "--context-size", "32", "--out", str(acts)]) == 0
    conf = tmp_path / "train.yaml"
    conf.write_text("k: 4\nexpansion: 2\nbatch_size: 256\n")
    assert main(["train", "--activations", str(acts), "--config", str(conf), "--tokens", "2048", "--k", "3",
                 "--out", str(tmp_path / "sae")]) == 0
    sae = SparseCoder.load(tmp_path / "sae" / "topk")
    assert (sae.cfg.k, sae.cfg.d_sae, sae.cfg.hook_point) == (3, 64, "blocks.1.hook_resid_post")
    assert sae.cfg.metadata["model"] == str(tiny_gpt2_path)
    assert main(["train", "--activations", str(acts), "--hook", "blocks.0.hook_resid_post",
                 "--out", str(tmp_path / "x")]) == 2
