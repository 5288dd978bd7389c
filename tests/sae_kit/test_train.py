"""The trainer: schedules, geometric median, feature recovery, folding, sweeps, exact resume, NaN, bad input, CLI."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from sae_kit.sae import SparseCoder
from sae_kit.train import TensorSource, TrainConfig, train, train_all
from sae_kit.train.checkpoint import latest_checkpoint, load_part
from sae_kit.train.dead import DeadLatentTracker, fired_latents
from sae_kit.train.geometric_median import geometric_median
from sae_kit.train.schedule import default_lr, lr_at, sparsity_at

HOOK = "h"


def synthetic(n: int = 16384, d: int = 32, n_features: int = 64, active: int = 3, seed: int = 0, scale: float = 7.0):
    """Rows that are sparse non-negative combinations of known unit directions, scaled away from unit norm."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=gen)
    features /= features.norm(dim=1, keepdim=True)
    codes = torch.zeros(n, n_features)
    idx = torch.stack([torch.randperm(n_features, generator=gen)[:active] for _ in range(n)])
    codes.scatter_(1, idx, torch.rand(n, active, generator=gen) + 0.5)
    return scale * codes @ features + 3.0, features  # + an offset, so b_dec has something to find


def cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(hook_points=HOOK, architecture="topk", k=3, d_sae=128, n_tokens=16384 * 6, batch_size=256,
                lr=3e-3, out=str(tmp_path), log_every=5, dead_tokens_threshold=20_000)
    base.update(kw)
    return TrainConfig(**base)


def lines(path):
    return [json.loads(s) for s in (path / "metrics.jsonl").read_text().splitlines()]


class Dying(TensorSource):
    """A source whose stream dies with KeyboardInterrupt after `die_at` batches (a killed run)."""

    def __init__(self, tensors, die_at):
        super().__init__(tensors)
        self.die_at = die_at

    def batches(self, *a, **k):
        for i, b in enumerate(super().batches(*a, **k)):
            if i == self.die_at:
                raise KeyboardInterrupt
            yield b


class Counting(TensorSource):
    """Counts the batches read from it."""

    read = 0

    def batches(self, *a, **k):
        for b in super().batches(*a, **k):
            self.read += 1
            yield b


# -- pure pieces ---------------------------------------------------------------------------------------------

def test_lr_schedules_are_pure_functions_of_the_step():
    assert lr_at(0, 100, 1.0, 10, 0.8) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.8) == pytest.approx(1.0)
    assert lr_at(50, 100, 1.0, 10, 0.8) == 1.0
    assert lr_at(80, 100, 1.0, 10, 0.8) == 1.0
    assert lr_at(99, 100, 1.0, 10, 0.8) == pytest.approx(0.0)
    assert lr_at(99, 100, 1.0, 10, 0.8, final_fraction=0.1) == pytest.approx(0.1)
    mid = 80 + (99 - 80) / 2
    assert lr_at(int(mid), 100, 1.0, 10, 0.8, decay="cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(mid) - 80) / 19)))
    assert lr_at(95, 100, 1.0, 10, 0.8, decay="none") == 1.0
    lin = [lr_at(s, 100, 1.0, 10, 0.5) for s in range(50, 100)]
    assert all(a >= b for a, b in zip(lin, lin[1:]))  # monotone decay
    # A pure function of the step (what resume relies on): called in any order, each step gets the same value,
    # and that value is the formula's (step 37 of a linear decay from step 30 to the last, 99).
    in_order = [lr_at(s, 100, 2.0, 10, 0.3) for s in range(100)]
    shuffled = random.Random(0).sample(range(100), 100)
    assert [dict(zip(shuffled, [lr_at(s, 100, 2.0, 10, 0.3) for s in shuffled]))[s] for s in range(100)] == in_order
    assert in_order[37] == pytest.approx(2.0 * (1 - (37 - 30) / (99 - 30)))
    with pytest.raises(ValueError, match="warp"):
        lr_at(90, 100, 1.0, 10, 0.8, decay="warp")


def test_sparsity_warmup_and_default_lr():
    assert sparsity_at(0, 100, 2.0) == pytest.approx(0.4)
    assert sparsity_at(4, 100, 2.0) == 2.0 and sparsity_at(50, 100, 2.0) == 2.0
    assert sparsity_at(9, 100, 1.0, warmup_fraction=0.2) == pytest.approx(0.5)
    assert default_lr(16384) == pytest.approx(2e-4) and default_lr(4 * 16384) == pytest.approx(1e-4)


def test_geometric_median_matches_known_answers():
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    torch.testing.assert_close(geometric_median(square), torch.tensor([1.0, 1.0]), atol=1e-4, rtol=0)
    collinear = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])  # the median of the line: the middle point
    torch.testing.assert_close(geometric_median(collinear, max_iter=2000), torch.tensor([1.0, 0.0]), atol=1e-2, rtol=0)
    # equilateral triangle: the Fermat point is the centroid
    tri = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    torch.testing.assert_close(geometric_median(tri), tri.mean(0), atol=1e-4, rtol=0)
    pts = torch.cat([torch.zeros(50, 3), torch.full((5, 3), 1000.0)])
    assert geometric_median(pts).norm() < 1.0 < pts.mean(0).norm()  # robust to outliers, unlike the mean


def test_dead_tracker_counts_tokens_since_firing():
    tracker = DeadLatentTracker(4, threshold=100)
    fired = fired_latents(torch.tensor([[1.0, 0.0], [2.0, 3.0]]), torch.tensor([[0, 2], [0, 1]]), 4)
    assert fired.tolist() == [True, True, False, False]
    tracker.update(fired, 60)
    tracker.update(fired_latents(torch.tensor([[0.0, 5.0, 0.0, 0.0]]), None, 4), 60)
    assert tracker.since_fired.tolist() == [60, 0, 120, 120]
    assert tracker.dead_mask.tolist() == [False, False, True, True] and tracker.dead_fraction == 0.5


# -- the loop -------------------------------------------------------------------------------------------------

def test_recovers_true_features_and_reduces_fvu(tmp_path):
    x, features = synthetic()
    path = train(cfg(tmp_path), TensorSource({HOOK: x}), progress=False)
    assert path == tmp_path / "topk" and (path / "COMPLETE").exists()
    sae = SparseCoder.load(path)
    dirs = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    max_cos = (features @ dirs.T).max(dim=1).values
    assert max_cos.mean() > 0.9, max_cos.mean()
    log = lines(path)
    assert log[0]["fvu"] > 3 * log[-1]["fvu"], (log[0]["fvu"], log[-1]["fvu"])
    assert {"step", "tokens", "loss", "fvu", "l0", "dead_frac", "lr"} <= set(log[-1])
    assert log[-1]["l0"] <= 3 and log[-1]["tokens"] == log[-1]["step"] * 256
    meta = sae.cfg.metadata
    assert meta["tokens_seen"] == 16384 * 6 // 256 * 256 and meta["hook_point"] == HOOK
    assert set(meta["final_metrics"]) >= {"fvu", "l0", "dead_frac"}


def test_saved_sae_takes_raw_activations(tmp_path):
    """Normalisation folding: the saved SAE on raw x reconstructs exactly as the in-training SAE on scaled x."""
    x, _ = synthetic(n=8192)
    path = train(cfg(tmp_path, n_tokens=8192 * 3), TensorSource({HOOK: x}), progress=False)
    saved = SparseCoder.load(path)
    s = saved.cfg.metadata["input_scale_folded"]
    assert s == pytest.approx(math.sqrt(32 / x.pow(2).sum(1).mean().item()), rel=1e-4)
    in_training = SparseCoder.load(path)
    in_training.fold_scaling_(1 / s, 1 / s)  # un-fold: the weights as they were during training
    with torch.no_grad():
        raw = saved.decode(saved.encode(x))
        scaled = in_training.decode(in_training.encode(x * s)) / s
        torch.testing.assert_close(saved.encode(x), in_training.encode(x * s), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(raw, scaled, rtol=1e-4, atol=1e-3)
    fvu = ((x - raw).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu < 0.2 and fvu == pytest.approx(saved.cfg.metadata["final_metrics"]["fvu"], abs=0.05)


def test_saved_sae_records_latent_max_acts_for_steering(tmp_path):
    """metadata["latent_max_acts"] is each latent's max |activation| on the raw rows; steering reads it as its unit."""
    from sae_kit.steering.steer import latent_scales

    x, _ = synthetic(n=4096)
    sae = SparseCoder.load(train(cfg(tmp_path, n_tokens=4096 * 3), TensorSource({HOOK: x}), progress=False))
    recorded = torch.tensor(sae.cfg.metadata["latent_max_acts"])
    with torch.no_grad():
        expected = sae.encode(x).abs().amax(dim=0)  # every row is seen: 4096 < MAX_ACTS_ROWS
    assert recorded.shape == (128,) and (recorded > 0).sum() >= 32
    torch.testing.assert_close(recorded, expected, rtol=1e-4, atol=1e-4)
    live = int(recorded.argmax())
    assert latent_scales(None, sae, [live]) == {live: pytest.approx(float(expected[live]), rel=1e-4)}


class ShortStream:
    """A stream like StreamingActivations: no row count, one pass, and its last partial batch dropped."""

    def __init__(self, x):
        self.inner, self.hook_points, self.model = TensorSource({HOOK: x}), [HOOK], "stream"
        self.d_in, self.norm_stats = self.inner.d_in, self.inner.norm_stats

    def batches(self, hook_points, batch_size, shuffle=True, seed=0, epochs=1, start_batch=0, **kw):
        if batch_size > self.inner.n_rows:
            return iter(())
        return self.inner.batches(hook_points, batch_size, shuffle=shuffle, seed=seed, epochs=1,
                                  start_batch=start_batch)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_a_short_stream_calibrates_and_records_max_acts_on_the_rows_it_has(tmp_path, arch):
    """A stream holding fewer rows than the calibration and max-activation passes ask for in one batch (a short
    streaming run): BatchTopK still calibrates, and every latent's max |activation| comes from the rows there are,
    with their count recorded (not zeros over a planned count)."""
    x, _ = synthetic(n=1536)
    sae = SparseCoder.load(train(cfg(tmp_path, architecture=arch, n_tokens=256 * 4), ShortStream(x), progress=False))
    meta = sae.cfg.metadata
    assert meta["latent_max_acts_rows"] == 1536
    with torch.no_grad():
        expected = sae.encode(x).abs().amax(dim=0)
    torch.testing.assert_close(torch.tensor(meta["latent_max_acts"]), expected, rtol=1e-4, atol=1e-4)
    assert (expected > 0).any()
    if arch == "batchtopk":
        assert float(sae.threshold) > 0


def test_sweep_trains_several_saes_on_shared_batches(tmp_path):
    x, _ = synthetic(n=4096)
    source = Counting({HOOK: x, "g": x.flip(1)})
    c = cfg(tmp_path / "sweep", n_tokens=4096 * 2, hook_points=(HOOK, "g"), sweep={"k": [2, 3]})
    paths = train_all(c, source, progress=False)
    assert [p.name for p in paths] == ["topk_h_k2", "topk_h_k3", "topk_g_k2", "topk_g_k3"]
    # one read per step, shared by all four SAEs, and one more to record every latent's max activation
    assert source.read == 4096 * 2 // 256 + 1
    assert [SparseCoder.load(p).cfg.k for p in paths] == [2, 3, 2, 3]
    assert SparseCoder.load(paths[2]).cfg.hook_point == "g"
    # each SAE of the sweep is the SAE one would get training it alone
    alone = train(cfg(tmp_path / "alone", n_tokens=4096 * 2, k=3), TensorSource({HOOK: x}), progress=False)
    for name, p in SparseCoder.load(alone).state_dict().items():
        torch.testing.assert_close(SparseCoder.load(paths[1]).state_dict()[name], p)


def test_seeds_train_a_consistency_pair_in_one_pass(tmp_path):
    import argparse

    from sae_kit.train.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    c = config_from_args(parser.parse_args(["--hook", HOOK, "--seeds", "0,1", "--d-sae", "64", "--k", "3"]))
    assert c.sweep.seed == (0, 1) and c.seed == 0
    x, _ = synthetic(n=4096)
    source = Counting({HOOK: x})
    c = cfg(tmp_path / "pair", n_tokens=4096 * 2, d_sae=64, sweep={"seed": [0, 1]})
    paths = train_all(c, source, progress=False)
    assert [p.name for p in paths] == ["topk_seed0", "topk_seed1"]
    assert source.read == 4096 * 2 // 256 + 1  # one pass over the data for both
    a, b = (SparseCoder.load(p).state_dict() for p in paths)
    assert not torch.allclose(a["W_dec"], b["W_dec"])  # different initialisations
    # seed 1 of the pair is the SAE a run with --seed 1 would give, when the data order is the same
    alone = train(cfg(tmp_path / "alone", n_tokens=4096 * 2, d_sae=64, sweep={"seed": [1]}), TensorSource({HOOK: x}),
                  progress=False)
    for name, p in SparseCoder.load(alone).state_dict().items():
        torch.testing.assert_close(b[name], p)
    with pytest.raises(ValueError, match=r"sweep.seed values must be >= 0"):
        cfg(tmp_path, sweep={"seed": [0, -1]})


def test_final_metrics_are_the_mean_of_a_window_that_cfg_json_and_the_marker_both_state(tmp_path):
    x, _ = synthetic(n=4096)
    path = train(cfg(tmp_path, n_tokens=256 * 60, log_every=1), TensorSource({HOOK: x}), progress=False)
    meta = SparseCoder.load(path).cfg.metadata
    n = meta["final_metrics_window_steps"]
    assert n == 50 and meta["steps"] == 60
    fvus = [r["fvu"] for r in lines(path)]
    assert meta["final_metrics"]["fvu"] == pytest.approx(sum(fvus[-n:]) / n, rel=1e-5)
    assert meta["final_metrics"]["fvu"] != pytest.approx(fvus[-1], rel=1e-3)  # not the last step's value
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["fvu"] == meta["final_metrics"]["fvu"] and marker["final_metrics_window_steps"] == n


def test_resume_reproduces_uninterrupted_run(tmp_path):
    x, _ = synthetic(n=4096)
    kw = dict(n_tokens=4096 * 3, sweep={"lr": [3e-3, 1e-3]}, checkpoint_every=256 * 10)
    full = train_all(cfg(tmp_path / "a", **kw), TensorSource({HOOK: x}), progress=False)
    interrupted = cfg(tmp_path / "b", **kw)
    with pytest.raises(KeyboardInterrupt):
        train_all(interrupted, Dying({HOOK: x}, die_at=27), progress=False)
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step_000000020" and load_part(ckpt, "state.pt")["batches_consumed"] == 20
    with pytest.raises(FileExistsError, match="--resume"):
        train_all(interrupted, TensorSource({HOOK: x}), progress=False)
    resumed = train_all(interrupted, TensorSource({HOOK: x}), resume=True, progress=False)
    assert not (tmp_path / "b" / ".checkpoints").exists()
    for a_path, b_path in zip(full, resumed):
        a, b = SparseCoder.load(a_path), SparseCoder.load(b_path)
        for name, p in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[name], p, rtol=1e-5, atol=1e-6)
        la, lb = lines(a_path), lines(b_path)
        assert [r["step"] for r in la] == [r["step"] for r in lb]  # no duplicated or missing lines
        assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5)


def test_a_pass_killed_while_publishing_resumes_and_publishes_the_rest(tmp_path, monkeypatch):
    """Killed between publishing one SAE of a sweep and the next: --resume keeps the published one, retrains from
    the checkpoint and publishes the rest, all equal to an uninterrupted pass; without --resume, or with another
    config, the published SAE is not touched."""
    from sae_kit.train import loop

    x, _ = synthetic(n=4096)
    kw = dict(n_tokens=256 * 30, checkpoint_every=256 * 10, sweep={"k": [2, 3]})
    full = train_all(cfg(tmp_path / "a", **kw), TensorSource({HOOK: x}), progress=False)
    real_replace = loop.os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if str(src).endswith(".partial"):
            raise KeyboardInterrupt  # the process dies right after the first rename

    monkeypatch.setattr(loop.os, "replace", replace_then_die)
    killed = cfg(tmp_path / "b", **kw)
    with pytest.raises(KeyboardInterrupt):
        train_all(killed, TensorSource({HOOK: x}), progress=False)
    monkeypatch.setattr(loop.os, "replace", real_replace)
    published = (tmp_path / "b" / "topk_k2" / "sae_weights.safetensors").read_bytes()
    assert not (tmp_path / "b" / "topk_k3").exists() and latest_checkpoint(tmp_path / "b") is not None
    with pytest.raises(FileExistsError, match="topk_k2 already exists"):
        train_all(killed, TensorSource({HOOK: x}), progress=False)
    with pytest.raises(FileExistsError, match="topk_k2 already exists"):
        train_all(killed.replace(lr=1e-3), TensorSource({HOOK: x}), resume=True, progress=False)
    resumed = train_all(killed, TensorSource({HOOK: x}), resume=True, progress=False)
    assert (tmp_path / "b" / "topk_k2" / "sae_weights.safetensors").read_bytes() == published
    assert not (tmp_path / "b" / ".checkpoints").exists()
    for a_path, b_path in zip(full, resumed):
        a, b = SparseCoder.load(a_path), SparseCoder.load(b_path)
        for name, p in a.state_dict().items():
            assert torch.equal(p, b.state_dict()[name]), (b_path.name, name)


def test_resume_with_different_config_is_refused(tmp_path):
    x, _ = synthetic(n=2048)
    c = cfg(tmp_path, n_tokens=2048 * 2, checkpoint_every=256 * 4)
    with pytest.raises(KeyboardInterrupt):
        train(c, Dying({HOOK: x}, die_at=6), progress=False)
    ckpts = sorted((tmp_path / ".checkpoints").glob("step_*/*"))
    before = {p: p.read_bytes() for p in ckpts}
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.003 vs now 0.01.*seed: checkpoint 0 vs now 1"):
        train(c.replace(lr=1e-2, seed=1), TensorSource({HOOK: x}), resume=True, progress=False)
    with pytest.raises(ValueError, match="d_in"):  # same config, activations of another width
        train(c, TensorSource({HOOK: x[:, :16]}), resume=True, progress=False)
    assert {p: p.read_bytes() for p in sorted((tmp_path / ".checkpoints").glob("step_*/*"))} == before


def test_resuming_into_a_sweep_names_the_swept_axis_not_the_unused_scalar(tmp_path):
    # `--k 8,16` leaves the scalar k at its default (32), which no SAE of the sweep uses: naming it misleads.
    x, _ = synthetic(n=2048)
    c = cfg(tmp_path, k=8, n_tokens=2048 * 2, checkpoint_every=256 * 4)
    with pytest.raises(KeyboardInterrupt):
        train(c, Dying({HOOK: x}, die_at=6), progress=False)
    swept = TrainConfig.from_dict({**c.to_dict(), "k": [8, 16], "sweep": {}})
    assert swept.k == 32 and swept.sweep.k == (8, 16)
    with pytest.raises(ValueError, match=r"differs \(sweep\.k: checkpoint \(none, k=8\) vs now \[8, 16\]\);") as err:
        train_all(swept, TensorSource({HOOK: x}), resume=True, progress=False)
    assert "vs now 32" not in str(err.value)  # the unused scalar k
    with pytest.raises(ValueError, match=r"differs \(k: checkpoint 8 vs now 16\);"):  # unswept: the field itself
        train(c.replace(k=16), TensorSource({HOOK: x}), resume=True, progress=False)


def test_resume_names_the_folders_any_way(tmp_path, monkeypatch):
    """The output folder spelled another way on resume (`./b/` or its absolute path for `b`; the store's folder is
    compared the same way) is the same run and resumes; another learning rate is still refused."""
    x, _ = synthetic(n=2048)
    monkeypatch.chdir(tmp_path)
    c = cfg(tmp_path, n_tokens=2048 * 2, checkpoint_every=256 * 4).replace(out="b")
    with pytest.raises(KeyboardInterrupt):
        train(c, Dying({HOOK: x}, die_at=6), progress=False)
    with pytest.raises(ValueError, match=r"the config differs \(lr: checkpoint 0.003 vs now 0.01\)"):
        train(c.replace(out=str(tmp_path / "b"), lr=1e-2), TensorSource({HOOK: x}), resume=True, progress=False)
    assert train(c.replace(out="./b/"), TensorSource({HOOK: x}), resume=True, progress=False) == Path("b/topk")


class Poisoned(TensorSource):
    """Batch `bad_at` of the stream holds a NaN row (the statistics are clean, as a store's can be)."""

    def __init__(self, tensors, bad_at):
        super().__init__(tensors)
        self.bad_at = bad_at

    def batches(self, *a, start_batch=0, **k):
        for i, b in enumerate(super().batches(*a, start_batch=start_batch, **k), start=start_batch):
            if i == self.bad_at:
                b = {h: t.clone() for h, t in b.items()}
                b[HOOK][7] = float("nan")
            yield b


def test_nan_loss_stops_with_step_and_checkpoint_of_last_good_state(tmp_path):
    x, _ = synthetic(n=2048)
    c = cfg(tmp_path, n_tokens=2048, lr=1e-3)
    with pytest.raises(FloatingPointError, match=r"at step 5 \(batch index 5, rows 1280\.\.1535.*saved in"):
        train(c, Poisoned({HOOK: x}, bad_at=5), progress=False)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and load_part(ckpt, "state.pt")["step"] == 5
    state = load_part(ckpt, "sae-topk.pt")["sae"]
    assert all(torch.isfinite(v).all() for v in state.values())  # the last good state, not the NaN one
    assert not (tmp_path / "topk").exists()
    # the data fixed, the run resumes from that state and finishes
    assert train(c, TensorSource({HOOK: x}), resume=True, progress=False) == tmp_path / "topk"


class PoisonedRow(TensorSource):
    """Row `row` of batch `bad_at` of the stream is NaN."""

    def __init__(self, tensors, bad_at, row):
        super().__init__(tensors)
        self.bad_at, self.row = bad_at, row

    def batches(self, *a, start_batch=0, **k):
        for i, b in enumerate(super().batches(*a, start_batch=start_batch, **k), start=start_batch):
            if i == self.bad_at:
                b = {h: t.clone() for h, t in b.items()}
                b[HOOK][self.row] = float("nan")
            yield b


def test_nan_in_a_later_micro_batch_names_its_rows_and_only_the_sae_it_reached(tmp_path):
    """Two SAEs of a sweep, the second reading another hook: only the one whose rows hold the NaN is named, with
    the rows of the micro-batch that went wrong."""
    x, _ = synthetic(n=2048)
    c = cfg(tmp_path, n_tokens=2048, lr=1e-3, micro_batches=2, hook_points=[HOOK, "clean"])
    with pytest.raises(FloatingPointError) as err:
        train_all(c, PoisonedRow({HOOK: x, "clean": x.clone()}, bad_at=3, row=200), progress=False)
    message = str(err.value)
    assert "loss nan at step 3 (batch index 3, rows 896..1023" in message  # micro-batch 1 of 2: rows 128..255
    assert message.count("SAE ") == 1 and "clean" not in message.split(". The last")[0]
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and load_part(ckpt, "state.pt")["step"] == 3


def test_non_finite_gradient_with_finite_loss_halts_and_saves_the_last_good_state(tmp_path, monkeypatch):
    import sae_kit.train.loop as loop

    calls = [0]
    real = loop.grad_norm

    def norm_overflowing_at_step_1(params):
        calls[0] += 1
        norm = real(params)
        return norm * math.inf if calls[0] == 2 else norm

    monkeypatch.setattr(loop, "grad_norm", norm_overflowing_at_step_1)
    x, _ = synthetic(n=2048)
    c = cfg(tmp_path, n_tokens=2048, lr=1e-3)
    with pytest.raises(FloatingPointError, match=r"SAE topk: gradient norm inf at step 1 \(batch index 1\)"):
        train(c, TensorSource({HOOK: x}), progress=False)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and load_part(ckpt, "state.pt")["step"] == 1
    # The saved weights are a clean run's after 1 step: neither the step with the bad norm nor the 3 steps run
    # before the sync point that saw it (log_every 5) changed anything.
    monkeypatch.setattr(loop, "grad_norm", real)
    clean: dict[int, dict] = {}
    monkeypatch.setattr(loop, "after_checkpoint",
                        lambda step, path: clean.setdefault(step, load_part(path, "sae-topk.pt")["sae"]))
    train(c.replace(out=str(tmp_path / "clean"), checkpoint_every=256), TensorSource({HOOK: x}), progress=False)
    for name, value in load_part(ckpt, "sae-topk.pt")["sae"].items():
        assert torch.equal(value, clean[1][name]), name


def test_the_steps_bookkeeping_is_a_few_ops_per_sae_not_per_value(tmp_path):
    """A small GPU step can take longer to launch than to run, so the loop's bookkeeping (the non-finite check,
    clipping, the decoder fix-ups, dead-latent counters, metrics) stays within a budget of ops per SAE beyond the
    SAE's own forward, backward and Adam; a sweep's second SAE costs no more than the first. Counted with the
    instrument bench_gpu.py's host-time lines use, on the steps they time."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.bench_gpu import aten_ops, loop_step, ours

    torch.manual_seed(0)
    x = torch.randn(64, 16)
    bare = ours(x, 64, 4, None)
    one, _ = loop_step(x, 64, 4, "float32", tmp_path / "one")
    two, _ = loop_step(x, 64, 4, "float32", tmp_path / "two", sweep={"d_sae": [64, 96]})
    for step in (bare, one, two):
        step()  # Adam's state exists from here on
    ops_bare, ops_one, ops_two = aten_ops(bare), aten_ops(one), aten_ops(two)
    assert ops_one - ops_bare <= 54, (ops_bare, ops_one)  # 51 here at torch 2.13 (59 before the trims, 112 before the budget)
    assert ops_two - ops_one <= ops_one - 5, (ops_one, ops_two)  # the per-step check is shared, not repeated


def test_nan_from_cli_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import sae_kit.train.loop as loop
    from sae_kit.cli import main

    x, _ = synthetic(n=1024)
    monkeypatch.setattr(loop, "open_source", lambda c: Poisoned({HOOK: x}, bad_at=0))
    assert main(["train", "--hook", HOOK, "--out", str(tmp_path), "--d-sae", "64", "--k", "3", "--tokens", "512",
                 "--batch-size", "256", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "step 0 (batch index 0" in err and "Traceback" not in err


@pytest.mark.parametrize("every", [256 * 10, 0])
def test_ctrl_c_from_cli_is_one_line_exit_130_saying_how_to_go_on(tmp_path, capsys, monkeypatch, every):
    import sae_kit.train.loop as loop
    from sae_kit.cli import main

    x, _ = synthetic(n=4096)
    argv = ["train", "--hook", HOOK, "--out", str(tmp_path), "--d-sae", "64", "--k", "3", "--tokens", str(256 * 40),
            "--batch-size", "256", "--checkpoint-every", str(every), "--no-progress"]
    monkeypatch.setattr(loop, "open_source", lambda c: Dying({HOOK: x}, die_at=27))
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if every:
        assert err.strip() == ("sae-kit train: interrupted at step 27 of 40; the last checkpoint is step 20 "
                               "(continue with --resume)")
    else:
        assert err.strip() == ("sae-kit train: interrupted at step 27 of 40; nothing was saved (no checkpoint yet: "
                               "pass --checkpoint-every TOKENS to save some); re-running the same command starts over")
    # and what the line promises works
    monkeypatch.setattr(loop, "open_source", lambda c: TensorSource({HOOK: x}))
    assert main(argv + ["--resume"] * bool(every)) == 0
    assert (tmp_path / "topk" / "COMPLETE").exists()


def test_transcoder_learns_a_sparse_map(tmp_path):
    x, _ = synthetic()
    gen = torch.Generator().manual_seed(1)
    y = x @ torch.randn(32, 24, generator=gen) / 4  # a linear "MLP" into a different width
    path = train(cfg(tmp_path, transcoder=True, target_hook_points="y"),
                 TensorSource({HOOK: x, "y": y}), progress=False)
    sae = SparseCoder.load(path)
    assert sae.cfg.transcoder and sae.W_dec.shape == (128, 24) and sae.cfg.target_hook_point == "y"
    meta = sae.cfg.metadata
    assert meta["input_scale_folded"] != pytest.approx(meta["output_scale_folded"])  # separate scales
    with torch.no_grad():
        pred = sae.decode(sae.encode(x))
    assert (y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum() < 0.35  # the mean predictor scores 1


@pytest.mark.parametrize("bad,match", [
    (dict(k=0), "k must be positive, got 0"), (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(architecture="nope"), "'nope'.*valid"), (dict(n_tokens=-5), "n_tokens.*-5"),
    (dict(transcoder=True), "target_hook_points"), (dict(k=128), "k=128, d_sae=128"),
    (dict(lr_decay="step"), "lr_decay.*'step'"), (dict(sweep={"k": [4, 0]}), r"sweep.k.*\[4, 0\]"),
    (dict(sweep={"width": [1]}), "unknown sweep keys"), (dict(batch_size=100, micro_batches=3), "divisible"),
    (dict(skip_connection=True), "transcoder"),
])
def test_bad_config_names_the_value(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        cfg(tmp_path, **bad)


def test_bad_input_at_train_time(tmp_path):
    x, _ = synthetic(n=1024)
    with pytest.raises(ValueError, match="k=128"):  # k ≥ d_sae through a sweep
        train(cfg(tmp_path, d_sae=None, expansion=4, k=3, sweep={"k": [3, 128]}), TensorSource({HOOK: x}),
              progress=False)
    with pytest.raises(ValueError, match="'nope'.*'h'"):
        train(cfg(tmp_path, hook_points="nope"), TensorSource({HOOK: x}), progress=False)
    with pytest.raises(ValueError, match="batch_size 4096 exceeds the 1024 rows"):
        train(cfg(tmp_path, batch_size=4096), TensorSource({HOOK: x}), progress=False)
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"widht": 3})


def test_finished_run_is_not_overwritten(tmp_path):
    x, _ = synthetic(n=1024)
    train(cfg(tmp_path, n_tokens=1024), TensorSource({HOOK: x}), progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        train(cfg(tmp_path, n_tokens=1024), TensorSource({HOOK: x}), progress=False)
    # resuming a finished pass is a no-op that returns the folder
    assert train(cfg(tmp_path, n_tokens=1024), TensorSource({HOOK: x}), resume=True, progress=False) == tmp_path / "topk"


def test_abstopk_trains_with_signed_latents(tmp_path):
    x, _ = synthetic(n=4096)
    path = train(cfg(tmp_path, architecture="abstopk", n_tokens=4096 * 2), TensorSource({HOOK: -x}), progress=False)
    sae = SparseCoder.load(path)
    assert sae.cfg.architecture == "abstopk" and lines(path)[-1]["fvu"] < 0.5


def test_config_file_and_flags(tmp_path):
    import argparse

    from sae_kit.train.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (tmp_path / "c.yaml").write_text("k: 4\nexpansion: 2\nlr: 1e-3\nsweep:\n  k: [8, 16]\n  lr: [1e-3, 2e-3]\n")
    c = config_from_args(parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--k", "16,32", "--hook", "a,b",
                                            "--hook", "c"]))
    assert c.sweep.k == (16, 32) and c.sweep.lr == (1e-3, 2e-3) and c.hook_points == ("a", "b", "c")
    assert len(c.specs()) == 3 * 2 * 2
    (tmp_path / "c.toml").write_text('architecture = "abstopk"\nk = 5\nhook_point = "x"\n')
    c = config_from_args(parser.parse_args(["--config", str(tmp_path / "c.toml"), "--tokens", "999"]))
    assert (c.architecture, c.k, c.hook_points, c.n_tokens) == ("abstopk", 5, ("x",), 999)


def test_cli_trains_from_a_cache(tmp_path, tiny_gpt2_path):
    from sae_kit.cli import main

    acts = tmp_path / "acts"
    assert main(["cache", "--model", str(tiny_gpt2_path), "--hook", "blocks.1.hook_resid_post", "--tokens", "4096",
                 "--context-size", "32", "--out", str(acts)]) == 0
    conf = tmp_path / "train.yaml"
    conf.write_text("k: 4\nexpansion: 2\nbatch_size: 256\n")
    assert main(["train", "--activations", str(acts), "--config", str(conf), "--tokens", "2048", "--k", "2,3",
                 "--out", str(tmp_path / "sae"), "--no-progress"]) == 0
    for k in (2, 3):
        sae = SparseCoder.load(tmp_path / "sae" / f"topk_k{k}")
        assert (sae.cfg.k, sae.cfg.d_sae, sae.cfg.hook_point) == (k, 64, "blocks.1.hook_resid_post")
        assert sae.cfg.metadata["model"] == str(tiny_gpt2_path) and sae.cfg.metadata["dataset"]["path"] == "stdlib"
    assert main(["train", "--activations", str(acts), "--hook", "blocks.0.hook_resid_post",
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["train", "--activations", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2


def test_cli_trains_streaming_without_disk(tmp_path, tiny_gpt2_path):
    from sae_kit.cli import main

    assert main(["train", "--model", str(tiny_gpt2_path), "--hook", "blocks.0.hook_resid_post", "--dataset", "stdlib",
                 "--context-size", "32", "--tokens", "1024", "--batch-size", "256", "--k", "4", "--expansion", "2",
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    sae = SparseCoder.load(tmp_path / "s" / "topk")
    assert sae.cfg.d_in == 32 and sae.cfg.metadata["tokens_seen"] == 1024
    assert len(lines(tmp_path / "s" / "topk")) >= 1


def test_cli_streams_a_local_dataset_by_its_text_column(tmp_path, tiny_gpt2_path, capsys):
    """--text-column (and --dataset-config) reach the streamed dataset and its record, so evals and interp read the
    same text; before, streaming read only a `text` column and recorded the dataset as a bare path."""
    import json

    from sae_kit.cli import main

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"content": f"zebra okapi giraffe {i} " * 12}) + "\n" for i in range(200)))
    argv = ["train", "--model", str(tiny_gpt2_path), "--hook", "blocks.0.hook_resid_post", "--dataset", str(data),
            "--context-size", "32", "--tokens", "1024", "--batch-size", "256", "--k", "4", "--expansion", "2",
            "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "no-column")]) == 2  # the file has no `text` column
    assert "text" in capsys.readouterr().err
    assert main([*argv, "--text-column", "content", "--out", str(tmp_path / "s")]) == 0
    recorded = SparseCoder.load(tmp_path / "s" / "topk").cfg.metadata["dataset"]
    assert (recorded["path"], recorded["text_column"], recorded["name"]) == (str(data), "content", None)


@pytest.mark.parametrize("flags", [["--model", "reference"], ["--context-size", "64"], ["--text-column", "body"],
                                   ["--dataset", "stdlib", "--dataset-config", "x"]])
def test_streaming_flags_with_a_store_are_refused_not_ignored(tmp_path, flags, capsys):
    """With --activations the store fixed the model and text; a streaming flag would be silently ignored."""
    from sae_kit.cli import main

    assert main(["train", "--activations", str(tmp_path), *flags, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert flags[-2] in err and "streaming mode" in err


@pytest.mark.parametrize("arch,extra", [
    ("batchtopk", {}), ("jumprelu", {"sparsity_coefficient": 1e-3, "k": 32}), ("relu", {"sparsity_coefficient": 1e-3}),
])
def test_every_architecture_trains_saves_and_loads(tmp_path, arch, extra):
    x, _ = synthetic(n=4096)
    path = train(cfg(tmp_path, architecture=arch, n_tokens=4096 * 4, lr=3e-3, **extra), TensorSource({HOOK: x}),
                 progress=False)
    log = lines(path)
    assert log[-1]["fvu"] < log[0]["fvu"]
    if arch != "batchtopk":
        assert log[-1]["sparsity_coefficient"] == pytest.approx(1e-3) and log[-1]["sparsity_loss"] > 0
    sae = SparseCoder.load(path)
    assert sae.cfg.architecture == arch
    with torch.no_grad():
        recon = sae.decode(sae.encode(x))
    assert ((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item() < 1.0  # better than the mean


def test_wandb_receives_every_logged_line(tmp_path, monkeypatch):
    """--wandb logs the metrics.jsonl records under the SAE's name (a fake wandb module stands in for the real one)."""
    import sys
    import types

    logged, inits = [], []
    fake = types.ModuleType("wandb")

    class Run:
        finished = False

        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            Run.finished = True

    fake.init = lambda **kw: inits.append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    x, _ = synthetic(n=2048)
    path = train(cfg(tmp_path, n_tokens=2048 * 2, wandb=True, wandb_project="proj"), TensorSource({HOOK: x}),
                 progress=False)
    assert inits[0]["project"] == "proj" and inits[0]["config"]["architecture"] == "topk"
    records = lines(path)
    assert [s for s, _ in logged] == [r["step"] for r in records]
    assert [d["topk/fvu"] for _, d in logged] == [r["fvu"] for r in records]
    assert Run.finished


def test_trainer_calibrates_batchtopk_threshold_and_starts_jumprelu_at_target(tmp_path):
    """The trainer's architecture hooks: BatchTopK's saved θ is the exact cut on the data (inference L0 ≈ k);
    JumpReLU in its target form starts near the target L0 instead of ≈ d_sae/2."""
    x, _ = synthetic(n=4096)
    path = train(cfg(tmp_path / "b", architecture="batchtopk", n_tokens=4096 * 2), TensorSource({HOOK: x}),
                 progress=False)
    sae = SparseCoder.load(path)
    record = sae.cfg.metadata["batchtopk_threshold"]
    assert record["threshold"] == pytest.approx(float(sae.threshold)) and record["threshold_calibration_rows"] == 4096
    with torch.no_grad():
        assert float((sae.encode(x) != 0).sum(1).float().mean()) == pytest.approx(3, rel=0.05)
    jr = train(cfg(tmp_path / "j", architecture="jumprelu", target_l0=3.0, sparsity_coefficient=1.0,
                   n_tokens=256 * 2, log_every=1), TensorSource({HOOK: x}), progress=False)
    assert lines(jr)[0]["l0"] < 3 * 4  # a θ₀ = 0.001 start fires on about half of the 128 latents


def test_checkpoint_from_before_a_config_field_existed_still_resumes(tmp_path):
    """Fields (and sweep axes) a checkpoint predates count as their defaults; a changed value is still refused."""
    x, _ = synthetic(n=2048)
    c = cfg(tmp_path, n_tokens=2048 * 2, checkpoint_every=256 * 4)
    with pytest.raises(KeyboardInterrupt):
        train(c, Dying({HOOK: x}, die_at=6), progress=False)
    ckpt = latest_checkpoint(tmp_path)
    state, part = load_part(ckpt, "state.pt"), load_part(ckpt, "sae-topk.pt")
    del state["train_config"]["dtype"], state["train_config"]["sweep"]["lr"]
    del part["sae_config"]["target_l0"]
    torch.save(state, ckpt / "state.pt")
    torch.save(part, ckpt / "sae-topk.pt")
    with pytest.raises(ValueError, match="dtype: checkpoint 'auto' vs now 'bfloat16'"):
        train(c.replace(dtype="bfloat16"), TensorSource({HOOK: x}), resume=True, progress=False)
    assert train(c, TensorSource({HOOK: x}), resume=True, progress=False) == tmp_path / "topk"
