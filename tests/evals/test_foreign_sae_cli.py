"""`sae-kit eval`, `interp` and `steer` on SAEs in other toolkits' formats (a SAELens folder, a sparsify folder, a hub
id served from a local cache snapshot), with a tiny model saved locally whose hook names match."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from sae_kit.cli import main

D, D_SAE, K = 32, 64, 6


def write_saelens(folder: Path, model: Path) -> Path:
    """A SAELens 6 TopK SAE on the tiny GPT-2's blocks.0.hook_resid_post."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    cfg = {"architecture": "topk", "d_in": D, "d_sae": D_SAE, "k": K, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "layer_norm", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "model_name": str(model), "hook_name": "blocks.0.hook_resid_post",
                        "hook_head_index": None}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({"W_enc": torch.randn(D, D_SAE, generator=g) / D ** 0.5, "b_enc": torch.zeros(D_SAE),
               "W_dec": torch.randn(D_SAE, D, generator=g) / D ** 0.5, "b_dec": torch.zeros(D)},
              str(folder / "sae_weights.safetensors"))
    return folder


def write_sparsify(run: Path, model: Path) -> Path:
    """A sparsify run with one hook point, GPT-2's `h.0` (the first block's output)."""
    g = torch.Generator().manual_seed(1)
    folder = run / "h.0"
    folder.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": str(model), "hookpoints": ["h.0"]}))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 2, "normalize_decoder": True,
                                                 "num_latents": D_SAE, "k": K, "multi_topk": False,
                                                 "skip_connection": False, "transcode": False, "d_in": D}))
    save_file({"encoder.weight": torch.randn(D_SAE, D, generator=g) / D ** 0.5, "encoder.bias": torch.zeros(D_SAE),
               "W_dec": torch.randn(D_SAE, D, generator=g) / D ** 0.5, "b_dec": torch.zeros(D)},
              str(folder / "sae.safetensors"))
    return folder


@pytest.fixture(scope="module")
def foreign(tiny_gpt2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("foreign")
    return {"saelens": write_saelens(root / "lens", tiny_gpt2_path), "sparsify": write_sparsify(root / "run", tiny_gpt2_path)}


def test_eval_on_saelens_sparsify_and_hub_id(foreign: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """One eval over a SAELens folder, a sparsify folder and the same sparsify run served as hub id `org/repo/h.0`
    from a huggingface_hub cache snapshot (HF_HUB_OFFLINE=1: nothing is downloaded)."""
    rev = "f" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-saes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    shutil.copytree(foreign["sparsify"].parent, repo / "snapshots" / rev)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "eval"
    assert main(["eval", "--sae", str(foreign["saelens"]), str(foreign["sparsify"]), "someone/tiny-saes/h.0",
                 "--tokens", "256", "--context-size", "32", "--backend", "transformer_lens", "--no-progress",
                 "--out", str(out)]) == 0
    records = json.loads((out / "metrics.json").read_text())["core"]
    assert [r["sae_path"] for r in records][2] == "someone/tiny-saes/h.0"
    assert [r["hook_point"] for r in records] == ["blocks.0.hook_resid_post"] * 3
    for r in records:
        assert r["architecture"] == "topk" and 0 < r["l0"] <= K and r["fvu"] > 0
        assert r["max_abs_logit_diff_with_error"] < 1e-3  # the splice path is exact with the error term
    assert records[1]["fvu"] == records[2]["fvu"]  # the same SAE, from disk and from the hub cache


class _BagOfWords:
    """A fast stand-in for the sentence embedder (the scorer's surface: embed / similarity)."""

    def embed(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), 64)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, hash(w) % 64] += 1
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-9)

    def similarity(self, texts: list[str], query: str) -> list[float]:
        e = self.embed([query, *texts])
        return (e[1:] @ e[0]).tolist()


def test_interp_on_a_sparsify_folder(foreign: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("autointerp.scorers.default_embedder", _BagOfWords)
    out = tmp_path / "interp"
    assert main(["interp", "--sae", str(foreign["sparsify"]), "--backend", "transformer_lens", "--tokens", "512",
                 "--latents", "random:3", "--context-size", "32", "--window", "16", "--out", str(out),
                 "--no-progress"]) == 0
    assert len((out / "explanations.jsonl").read_text().splitlines()) == 3


def test_steer_on_a_saelens_folder(foreign: dict[str, Path], capsys) -> None:
    assert main(["steer", "--sae", str(foreign["saelens"]), "--backend", "transformer_lens", "--feature", "3",
                 "--mode", "clamp", "--strength", "4", "--max-new-tokens", "3"]) == 0
    assert "--- steered (clamp 4.0 on [3]) ---" in capsys.readouterr().out


def test_sae_on_one_attention_head_is_refused_clearly() -> None:
    from evals.evaluate import check_compatible as eval_check
    from sae_kit.sae import SAEConfig, SparseCoder
    from sae_kit.steering import check_compatible as steer_check

    sae = SparseCoder.from_config(SAEConfig(architecture="relu", d_in=8, d_sae=16, hook_point="blocks.0.attn.hook_z",
                                            hook_head_index=2))
    for check in (eval_check, steer_check):
        with pytest.raises(ValueError, match=r"reads one attention head \(hook_head_index=2\)"):
            check(None, sae)
