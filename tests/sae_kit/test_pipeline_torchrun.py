"""`sae-kit run` under torchrun: rank 0 caches while rank 1 waits, both train, and a later single-process run
picks up from there (2 gloo processes on CPU)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_pipeline import SAES, write_config

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two ranks plus a single-process run: about a minute on 2 cores
def test_two_ranks_cache_once_train_together_and_hand_over(tmp_path, tiny_gpt2_path):
    config = write_config(tmp_path / "run.yaml", tiny_gpt2_path, tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "sae_kit.cli", "run", str(config), "--until", "train",
           "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    assert done.stdout.count("[1/2] cache") == 1  # rank 0 alone runs and reports the stages
    for name in SAES:
        assert (out / "train/tk" / name / "sae_weights.safetensors").exists()
    assert (out / "train/tk/stage.json").exists() and not (out / "eval").exists()

    from sae_kit.pipeline import load_config, run_pipeline

    result = run_pipeline(load_config(str(config)), progress=False, until="eval")
    assert result.outcomes["cache"].action == "skip" and result.outcomes["train tk"].action == "skip"
    assert result.outcomes[f"eval {SAES[0]}"].action == "run"
