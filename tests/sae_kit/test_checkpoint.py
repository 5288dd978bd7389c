"""Checkpoints load tensors and plain data only: a pickled object is refused, never run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_kit.train import TensorSource, TrainConfig, train
from sae_kit.train import checkpoint as ckpt


class Payload:
    """Unpickling this runs code: it creates the file `flag` (a stand-in for anything worse)."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (open, (str(self.flag), "w"))


def tampered_checkpoint(out: Path, flag: Path) -> Path:
    """A complete-looking checkpoint whose state.pt carries a pickled object beside plain data."""
    folder = ckpt.begin_checkpoint(out, 4)
    ckpt.write_part(folder, ckpt.STATE, {"step": 4, "rng": {"torch": torch.get_rng_state()}, "x": Payload(flag)})
    return ckpt.commit_checkpoint(folder)


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    flag = tmp_path / "ran"
    folder = tampered_checkpoint(tmp_path / "run", flag)
    with pytest.raises(ValueError, match=r"state\.pt holds objects other than tensors.*refusing to unpickle"):
        ckpt.load_part(folder, ckpt.STATE)
    assert not flag.exists()
    # and through a resumed training run, before anything is trained or written
    cfg = TrainConfig(hook_points="h", k=2, d_sae=16, n_tokens=512, batch_size=64, out=str(tmp_path / "run"),
                      checkpoint_every=128)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        train(cfg, TensorSource({"h": torch.randn(256, 8)}), resume=True, progress=False)
    assert not flag.exists() and not (tmp_path / "run" / "topk").exists()


def test_a_plain_checkpoint_still_loads(tmp_path):
    folder = ckpt.begin_checkpoint(tmp_path, 8)
    state = {"step": 8, "rng": {"torch": torch.get_rng_state(), "cuda": None}, "names": ["topk"],
             "train_config": {"lr": None, "sweep": {"k": [1, 2]}}, "scales": (1.5, 2.0)}
    ckpt.write_part(folder, ckpt.STATE, state)
    loaded = ckpt.load_part(ckpt.commit_checkpoint(folder), ckpt.STATE)
    assert loaded["names"] == ["topk"] and loaded["scales"] == (1.5, 2.0)
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])



def test_cleanup_deletes_only_checkpoint_folders(tmp_path):
    done = ckpt.commit_checkpoint(ckpt.begin_checkpoint(tmp_path, 3))
    killed = ckpt.begin_checkpoint(tmp_path, 6)
    (killed / "sae-topk.pt").write_bytes(b"half")
    root = ckpt.checkpoint_root(tmp_path)
    lookalike = root / ".tmp-step_notes"
    lookalike.mkdir()
    (lookalike / "mine.txt").write_text("user data")
    holds_more = root / ".tmp-step_000000009"
    holds_more.mkdir()
    (holds_more / "results.csv").write_text("user data")
    ckpt.remove_temporaries(tmp_path)
    assert not killed.exists() and done.exists()
    assert (lookalike / "mine.txt").exists() and (holds_more / "results.csv").exists()
    ckpt.remove_checkpoints(tmp_path)
    assert not done.exists() and sorted(p.name for p in root.iterdir()) == [".tmp-step_000000009", ".tmp-step_notes"]
    (lookalike / "mine.txt").unlink()
    lookalike.rmdir()
    (holds_more / "results.csv").unlink()
    holds_more.rmdir()
    ckpt.remove_checkpoints(tmp_path)
    assert not root.exists()  # an emptied folder goes too


def test_cuda_generators_restore_onto_fewer_gpus(monkeypatch):
    """A checkpoint from a machine with more GPUs resumes where there are fewer: each GPU present gets its state."""
    from sae_kit.train import loop

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    loop._restore_cuda_rng(states)
    assert [d for d, _ in restored] == [0] and torch.equal(restored[0][1], states[0])
    restored.clear()
    loop._restore_cuda_rng(None)  # saved on a machine without CUDA
    assert restored == []
