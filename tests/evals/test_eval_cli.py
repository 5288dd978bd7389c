"""`sae-kit eval` end to end on the tiny GPT-2 with random TopK SAEs saved by SparseCoder.save."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from evals.evaluate import EvalConfig, dataset_config
from sae_kit.cli import main
from sae_kit.sae.base import SAEConfig, SparseCoder

HOOK = "blocks.0.hook_resid_post"
DOCUMENTED_KEYS = {
    "sae_path", "architecture", "hook_point", "d_sae", "l0", "fvu", "mse", "explained_variance",
    "cosine_similarity", "l2_ratio", "relative_reconstruction_bias", "ce_clean", "ce_sae", "ce_zero_ablation",
    "ce_mean_ablation", "ce_loss_recovered", "ce_loss_recovered_mean_ablation", "kl_sae", "kl_zero_ablation",
    "kl_score", "ce_sae_with_error", "dead_fraction", "dense_fraction", "max_decoder_cosine_mean",
    "enc_dec_cosine_mean", "n_tokens",
}


def save_topk(folder: Path, model_path: Path, k: int = 8, d_in: int = 32, hook: str = HOOK, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=128, k=k, hook_point=hook, model_name=str(model_path),
                    metadata={"dataset": {"path": "stdlib", "split": "train", "context_size": 32}})
    SparseCoder.from_config(cfg).save(folder)
    return folder


@pytest.fixture(scope="module")
def two_saes(tiny_gpt2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("saes")
    return [save_topk(root / f"k{k}", tiny_gpt2_path, k=k, seed=k) for k in (4, 16)]


def test_eval_cli_end_to_end(two_saes: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval"
    code = main(["eval", "--sae", *map(str, two_saes), "--tokens", "256", "--batch-size", "4",
                 "--backend", "transformer_lens", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["suites"] == ["core"] and len(metrics["scoreboard"]) == 2
    records = metrics["core"]
    assert len(records) == 2
    for rec, k in zip(records, (4, 16)):
        assert DOCUMENTED_KEYS <= set(rec), DOCUMENTED_KEYS - set(rec)
        assert rec["architecture"] == "topk" and rec["hook_point"] == HOOK and rec["d_sae"] == 128
        assert rec["n_tokens"] == 256  # 8 contexts of the recorded context size 32
        assert 0 < rec["l0"] <= k
        assert 0 <= rec["dead_fraction"] <= 1 and 0 <= rec["dense_fraction"] <= 1
        assert rec["fvu"] > 0 and rec["mse"] > 0 and -1 <= rec["cosine_similarity"] <= 1
        for key in ("ce_clean", "ce_sae", "ce_zero_ablation", "ce_mean_ablation", "kl_sae", "kl_zero_ablation"):
            assert math.isfinite(rec[key]) and rec[key] >= 0, key
        assert rec["ce_sae_with_error"] == pytest.approx(rec["ce_clean"], abs=1e-4)
        assert rec["kl_sae"] > 0  # a random SAE changes the model
        assert -1 <= rec["max_decoder_cosine_mean"] <= 1 and -1 <= rec["enc_dec_cosine_mean"] <= 1
    assert records[0]["ce_clean"] == pytest.approx(records[1]["ce_clean"])  # same held-out tokens for both
    html = (out / "report.html").read_text()
    assert html.count('<div class="plot">') == 4  # density, L0, and the two frontiers
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_dataset_always_held_out(tiny_gpt2_path: Path, tmp_path: Path) -> None:
    sae_cfg = SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hook_point=HOOK,
                        metadata={"dataset": {"path": "stdlib", "split": "train", "context_size": 32}})
    cfg = EvalConfig(sae_paths=("x",), out=str(tmp_path))
    d = dataset_config(sae_cfg, cfg)
    assert d.split == "eval" and d.context_size == 32 and d.path == "stdlib"
    d2 = dataset_config(sae_cfg, EvalConfig(sae_paths=("x",), out=str(tmp_path), context_size=16, dataset="/data"))
    assert d2.split == "eval" and d2.context_size == 16 and d2.path == "/data"


def run_err(args: list[str], capsys: pytest.CaptureFixture) -> str:
    code = main(["eval", *args, "--tokens", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_bad_inputs(tiny_gpt2_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "not_an_sae"
    empty.mkdir()
    err = run_err(["--sae", str(empty), "--out", str(tmp_path / "o1")], capsys)
    assert "matches no supported SAE format" in err and str(empty) in err and "cfg.json" in err
    bad_hook = save_topk(tmp_path / "bad_hook", tiny_gpt2_path, hook="blocks.0.hook_resid_pots")
    err = run_err(["--sae", str(bad_hook), "--out", str(tmp_path / "o2")], capsys)
    assert "unknown hook point 'blocks.0.hook_resid_pots'" in err and "blocks.0.hook_resid_post" in err
    wide = save_topk(tmp_path / "wide", tiny_gpt2_path, d_in=48)
    err = run_err(["--sae", str(wide), "--out", str(tmp_path / "o3")], capsys)
    assert "d_in=48" in err and "width 32" in err
    err = run_err(["--sae", str(wide), "--out", str(tmp_path / "o4"), "--batch-size", "0"], capsys)
    assert "batch_size must be positive" in err
    assert not (tmp_path / "o3" / "metrics.json").exists()
