"""Data-parallel training: 2 gloo processes on CPU (launched with torch.distributed.run) match one process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from unittest import mock
from pathlib import Path

import pytest
import torch

from sae_kit.sae import SparseCoder
from sae_kit.train import TensorSource, TrainConfig, loop, train_all
from sae_kit.train.distributed import SingleProcess

REPO = Path(__file__).resolve().parents[2]
SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from sae_kit.train import TensorSource, TrainConfig, train_all
    x = torch.load(sys.argv[1])
    returned = []
    for c in json.loads(sys.argv[2]):  # several passes in one launch: the process-group start-up is paid once
        returned.append([str(p) for p in train_all(TrainConfig.from_dict(c), TensorSource({"h": x}), progress=False)])
    with open(sys.argv[1] + f".rank{os.environ['RANK']}.json", "w") as f:
        json.dump(returned, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, x, cfgs: list[TrainConfig]) -> None:
    (tmp_path / "run.py").write_text(SCRIPT)
    torch.save(x, tmp_path / "x.pt")
    # The script runs from tmp_path: put this checkout first on its path, so the ranks run the code under test.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(tmp_path / "run.py"), str(tmp_path / "x.pt"),
           json.dumps([c.to_dict() for c in cfgs])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def _data(n=2048, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(48, d, generator=gen)
    codes = (torch.rand(n, 48, generator=gen) < 0.06) * (torch.rand(n, 48, generator=gen) + 0.5)
    return 5 * codes @ feats + 1.0


def _base(out, **kw) -> TrainConfig:
    return TrainConfig(hook_points="h", k=4, d_sae=256, n_tokens=2048 * 2, batch_size=256, lr=3e-3, out=str(out),
                       log_every=2, dead_tokens_threshold=256, warmup_steps=2, **kw)


def test_two_gloo_ranks_match_single_process(tmp_path):
    """Data parallel: each rank takes half of every global batch and gradients are averaged, which gives the
    numbers of one process averaging the gradients of the two halves (micro_batches=2); dead-latent counters
    (AuxK) stay in sync. --distribute-modules: each rank trains whole SAEs on full batches, as one process does."""
    x = _data()
    dp_cfg = _base(tmp_path / "ddp", sweep={"k": [3, 4]}, checkpoint_every=256 * 5)
    mod_cfg = _base(tmp_path / "mod", sweep={"k": [3, 4]}, distribute_modules=True)
    _torchrun(tmp_path, x, [dp_cfg, mod_cfg])
    single = train_all(dp_cfg.replace(out=str(tmp_path / "one"), micro_batches=2), TensorSource({"h": x}),
                       progress=False)
    for p in single:
        ddp = tmp_path / "ddp" / p.name
        a, b = SparseCoder.load(p), SparseCoder.load(ddp)
        for name, w in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[name], w, rtol=1e-4, atol=1e-5)
        la = [json.loads(s) for s in (p / "metrics.jsonl").read_text().splitlines()]
        lb = [json.loads(s) for s in (ddp / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in la] == [r["step"] for r in lb]  # rank 0 alone wrote the metrics
        assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-4)
        assert max(r["auxk_loss"] for r in la) > 0  # dead latents were tracked and used
    assert not (tmp_path / "ddp" / ".checkpoints").exists()
    for rank in (0, 1):  # every rank returns every SAE of the pass, those another rank trained too
        returned = json.loads((tmp_path / f"x.pt.rank{rank}.json").read_text())
        assert returned == [[str(tmp_path / "ddp" / n) for n in ("topk_k3", "topk_k4")],
                            [str(tmp_path / "mod" / n) for n in ("topk_k3", "topk_k4")]], rank
    plain = train_all(_base(tmp_path / "plain", sweep={"k": [3, 4]}), TensorSource({"h": x}), progress=False)
    for p in plain:
        # modules spread over ranks: identical to one process
        a, b = SparseCoder.load(p), SparseCoder.load(tmp_path / "mod" / p.name)
        for name, w in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[name], w, rtol=1e-5, atol=1e-6)
        # data parallel: close to one process on whole batches (only the per-slice FVU normaliser differs)
        b = SparseCoder.load(tmp_path / "ddp" / p.name)
        assert (a.W_dec - b.W_dec).norm() / a.W_dec.norm() < 0.2


def test_micro_batches_average_slice_gradients(tmp_path):
    """The single-process stand-in the 2-rank test compares against: two micro-batches stay close to one batch."""
    x = _data(seed=2)
    one = train_all(_base(tmp_path / "a"), TensorSource({"h": x}), progress=False)[0]
    two = train_all(_base(tmp_path / "b", micro_batches=2), TensorSource({"h": x}), progress=False)[0]
    a, b = SparseCoder.load(one), SparseCoder.load(two)
    assert 0 < (a.W_dec - b.W_dec).norm() / a.W_dec.norm() < 0.2


class _RankZeroOfTwo(SingleProcess):
    """Rank 0 of a 2-rank data-parallel job whose other rank contributes nothing: enough to write its checkpoint."""

    world_size = 2


def test_resume_on_another_number_of_data_parallel_ranks_is_refused(tmp_path):
    """Each rank normalises and selects on its slice of the batch, so a checkpoint of 2 data-parallel ranks resumed in
    one process (or the other way round) would continue a different run: refused, naming both counts."""
    x = _data()
    cfg = _base(tmp_path / "two", checkpoint_every=256 * 4)
    with pytest.raises(RuntimeError, match="stop"), mock.patch.object(loop, "after_checkpoint",
                                                                       side_effect=RuntimeError("stop")):
        loop._train(cfg, TensorSource({"h": x}), False, False, torch.device("cpu"), _RankZeroOfTwo())
    with pytest.raises(ValueError, match=r"data parallel over 2 rank\(s\), now 1"):
        train_all(cfg, TensorSource({"h": x}), resume=True, progress=False)
    one = _base(tmp_path / "one", checkpoint_every=256 * 4)
    with pytest.raises(RuntimeError, match="stop"), mock.patch.object(loop, "after_checkpoint",
                                                                       side_effect=RuntimeError("stop")):
        train_all(one, TensorSource({"h": x}), progress=False)
    with pytest.raises(ValueError, match=r"data parallel over 1 rank\(s\), now 2"):
        loop._train(one, TensorSource({"h": x}), True, False, torch.device("cpu"), _RankZeroOfTwo())
    assert train_all(one, TensorSource({"h": x}), resume=True, progress=False)  # the same count resumes


class _PeerOverflows(_RankZeroOfTwo):
    """Rank 0 of two whose peer's gradients overflowed: every average comes back infinite."""

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            t.fill_(float("inf"))


def test_a_data_parallel_halt_reports_this_ranks_own_losses(tmp_path):
    """The halt record holds this rank's own losses, not the ranks' average that the metrics get (averaged in place):
    a finite loss here and an overflow on the peer reports the averaged gradient norm, not an infinite loss."""
    with pytest.raises(FloatingPointError) as err:
        loop._train(_base(tmp_path / "dp"), TensorSource({"h": _data()}), False, False, torch.device("cpu"),
                    _PeerOverflows())
    assert "SAE topk: gradient norm" in str(err.value) and "loss inf" not in str(err.value), err.value


class _RankOneOfTwo(_RankZeroOfTwo):
    rank = 1


def test_only_rank_0_logs_what_every_rank_would(tmp_path, caplog):
    """The loop's notes (no checkpoint to resume, λ = 0, ...) are the same on every rank: rank 0 logs them once,
    where every rank of a torchrun job used to repeat them."""
    x = _data(n=1024)
    cfg = _base(tmp_path / "o", architecture="relu").replace(n_tokens=1024)  # λ = 0
    for comm, expected in ((_RankOneOfTwo(), []), (_RankZeroOfTwo(), ["no checkpoint", "λ = 0"])):
        caplog.clear()
        with caplog.at_level("INFO", logger="sae_kit.train.loop"):
            loop._train(cfg, TensorSource({"h": x}), True, False, torch.device("cpu"), comm)
        assert [m for m in expected if not any(m in r.getMessage() for r in caplog.records)] == []
        assert len(caplog.records) == len(expected), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("device, current", [("cuda:1", "cuda:1"), ("cpu", None)])
def test_each_rank_makes_its_own_gpu_current(monkeypatch, device, current):
    """A rank training on cuda:N makes cuda:N its current device before the process group exists: NCCL's barrier
    and broadcast_object_list use the current device, which is GPU 0 on every rank otherwise."""
    import torch.distributed as dist

    from sae_kit.train.distributed import TorchDistributed

    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", seen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    TorchDistributed(torch.device(device))
    assert seen == ([torch.device(current)] if current else [])
