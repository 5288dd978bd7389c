"""Feature consistency: Hungarian matching of decoders, MCC, bad pairs, and `sae-kit eval --consistency A B`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import HOOK

from evals.consistency import consistency, match_latents, run_consistency
from sae_kit.cli import main
from sae_kit.sae.base import SAEConfig, SparseCoder


def sae_with_decoder(w_dec: torch.Tensor, hook: str = HOOK) -> SparseCoder:
    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=w_dec.shape[1], d_sae=w_dec.shape[0], k=2,
                                            hook_point=hook, model_name="not-a-model"))
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
    return sae


def test_permuted_and_sign_flipped_decoder_matches_perfectly():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 16, generator=gen)
    perm = torch.randperm(64, generator=gen)
    signs = torch.where(torch.rand(64, generator=gen) < 0.5, -1.0, 1.0)[:, None]
    m = match_latents(w, 3.0 * signs * w[perm])  # |cos| ignores scale and sign
    np.testing.assert_allclose(m.abs_cos, 1.0, atol=1e-6)
    assert (perm[torch.as_tensor(m.cols)] == torch.as_tensor(m.rows)).all()


def test_hungarian_beats_greedy_and_shares_count_matches():
    # A0 is closest to B0 (0.60 vs 0.55), but taking it leaves A1 with B1 (0.05): the optimum crosses them
    a = torch.tensor([[0.6, 0.55, 0.5809], [0.55, 0.05, 0.8337]])
    b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    m = match_latents(a, b)
    assert m.cols.tolist() == [1, 0] and m.abs_cos.sum() == pytest.approx(1.1, abs=1e-3)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(100, 32, generator=gen)
    noisy = w.clone()
    noisy[:50] += 0.1 * torch.randn(50, 32, generator=gen)  # half barely moved
    noisy[50:] = torch.randn(50, 32, generator=gen)  # half replaced by random directions
    out = consistency(sae_with_decoder(w), sae_with_decoder(noisy), ("a", "b"))
    assert out["share_above_0.9"] == pytest.approx(0.5, abs=0.02)
    assert 0.5 < out["mcc"] < 0.8 and sum(out["histogram"]["counts"]) == 100


def test_pairs_of_different_width_or_hook_point_are_refused():
    w = torch.randn(32, 8)
    with pytest.raises(ValueError, match=r"one width: A has d_sae=32, B has d_sae=16"):
        consistency(sae_with_decoder(w), sae_with_decoder(w[:16]))
    with pytest.raises(ValueError, match=r"one hook point: A reads .*, B reads 'blocks.1.hook_resid_post'"):
        consistency(sae_with_decoder(w), sae_with_decoder(w, hook="blocks.1.hook_resid_post"))
    saes = [("w32", sae_with_decoder(w)), ("w16", sae_with_decoder(w[:16])), ("w32b", sae_with_decoder(-w))]
    out = run_consistency(saes, strict=False)  # a sweep: the equal-width pair is compared, the rest listed
    assert [(p["a"], p["b"]) for p in out["pairs"]] == [("w32", "w32b")] and len(out["skipped"]) == 2
    with pytest.raises(ValueError, match="one width"):
        run_consistency(saes[:2])


def test_cli_consistency_needs_no_model(tmp_path: Path, capsys: pytest.CaptureFixture):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 8, generator=gen)
    sae_with_decoder(w).save(tmp_path / "a")
    sae_with_decoder(w[torch.randperm(48, generator=gen)]).save(tmp_path / "b")
    sae_with_decoder(w[:24]).save(tmp_path / "narrow")
    code = main(["eval", "--consistency", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["suites"] == ["consistency"] and "core" not in metrics  # model "not-a-model" never loaded
    assert metrics["consistency"]["pairs"][0]["mcc"] == pytest.approx(1.0)
    assert metrics["scoreboard"][0]["consistency_mcc"] == pytest.approx(1.0)
    assert 'class="plot"' in (tmp_path / "o" / "report.html").read_text()
    code = main(["eval", "--consistency", str(tmp_path / "a"), str(tmp_path / "narrow"), "--out",
                 str(tmp_path / "o2")])
    assert code == 2 and "d_sae=48" in capsys.readouterr().err


def test_an_eval_into_a_used_folder_leaves_nothing_of_the_earlier_one(tmp_path: Path, monkeypatch):
    """Re-running `sae-kit eval` into a folder an earlier eval (with core) wrote: a consistency-only eval drops the
    earlier sparsity.safetensors, and one killed while writing leaves no metrics.json (the completion marker)."""
    import evals.evaluate as evaluate

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 8, generator=gen)
    sae_with_decoder(w).save(tmp_path / "a")
    sae_with_decoder(-w).save(tmp_path / "b")
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.json").write_text('{"suites": ["core"], "core": []}')  # what an earlier core eval left
    evaluate.save_sparsity(out / "sparsity.safetensors", [])
    args = ["eval", "--consistency", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]
    real = evaluate.atomic_write_text

    def killed_at_the_report(path, text):
        if Path(path).name == "report.html":
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(evaluate, "atomic_write_text", killed_at_the_report)
    assert main(args) == 130  # Ctrl-C: one line and the shell's SIGINT code
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(evaluate, "atomic_write_text", real)
    assert main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["suites"] == ["consistency"]
    assert not (out / "sparsity.safetensors").exists()
