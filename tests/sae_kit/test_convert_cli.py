"""`sae-kit convert SRC DST --to FORMAT` end to end, errors as one line with exit code 2."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from foreign_files import inputs, saelens_cfg, saelens_forward, saelens_weights, write_gemma_scope, write_saelens

from sae_kit import SAE
from sae_kit.cli import main


def test_convert_saelens_to_sparsify_and_sae_kit(tmp_path: Path, capsys) -> None:
    cfg = saelens_cfg("topk", 16, 48, 16)
    w = saelens_weights("topk", 16, 48, 16)
    src = write_saelens(tmp_path / "lens", cfg, w)
    x = inputs(10, 16)
    _, out = saelens_forward(cfg, w, x)
    for fmt, marker in (("sparsify", "sae.safetensors"), ("sae-kit", "sae_weights.safetensors")):
        dst = tmp_path / fmt
        assert main(["convert", str(src), str(dst), "--to", fmt]) == 0
        assert f"as {fmt}" in capsys.readouterr().out and (dst / marker).exists()
        sae = SAE.load(dst)
        torch.testing.assert_close(sae.decode(sae.encode(x), x), out, atol=1e-6, rtol=0)
        assert sae.cfg.hook_point == "blocks.3.hook_resid_pre"
    assert json.loads((tmp_path / "sae-kit" / "cfg.json").read_text())["architecture"] == "topk"


def test_convert_errors(tmp_path: Path, capsys) -> None:
    cfg = saelens_cfg("standard", 8, 16, 8)
    src = write_saelens(tmp_path / "lens", cfg, saelens_weights("standard", 8, 16, 8))
    assert main(["convert", str(src), str(tmp_path / "sp"), "--to", "sparsify"]) == 2
    assert "sparsify holds TopK coders only" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["convert", str(src), str(tmp_path / "full"), "--to", "sae-kit"]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "o"), "--to", "sae-kit"]) == 2
    assert "no SAE at" in capsys.readouterr().err


def test_convert_sets_the_hook_points_a_gemma_scope_file_lacks(tmp_path: Path) -> None:
    write_gemma_scope(tmp_path / "gs", d_in=16, d_sae=40)
    args = ["convert", str(tmp_path / "gs"), str(tmp_path / "tc"), "--to", "sae-kit", "--model", "reference",
            "--hook-point", "blocks.1.ln2.hook_normalized", "--target-hook-point", "blocks.1.hook_mlp_out"]
    assert main(args) == 0
    cfg = SAE.load(tmp_path / "tc").cfg
    assert (cfg.transcoder, cfg.hook_point, cfg.target_hook_point) == (True, "blocks.1.ln2.hook_normalized",
                                                                       "blocks.1.hook_mlp_out")
