"""`sae-kit eval --suite ...` end to end on the tiny GPT-2: one metrics.json section per suite, the scoreboard, the
report's figures, hub datasets from local parquet, and the clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evals.suites import parse_suites, scoreboard
from sae_kit.cli import main
from sae_kit.sae.base import SAEConfig, SparseCoder

HOOK = "blocks.1.hook_resid_post"
FAST = ["--probe-tokens", "32768", "--probe-train", "120", "--probe-test", "60", "--concepts",
        "string,comment,keyword,indent_2", "--scr-pairs", "string+indent_2", "--probe-k", "1,2,5", "--tokens", "128",
        "--context-size", "64", "--batch-size", "4", "--backend", "transformer_lens", "--no-progress"]


def save_sae(folder: Path, model: Path, seed: int, d_sae: int = 96, hook: str = HOOK) -> Path:
    torch.manual_seed(seed)
    SparseCoder.from_config(SAEConfig(architecture="topk", d_in=32, d_sae=d_sae, k=6, hook_point=hook,
                                      model_name=str(model))).save(folder)
    return folder


@pytest.fixture(scope="module")
def pair(tiny_gpt2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("pair")
    return [save_sae(root / f"s{i}", tiny_gpt2_path, seed=i) for i in (0, 1)]


def test_every_suite_writes_its_section_and_the_report_its_figures(pair, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--sae", *map(str, pair), "--suite", "core,probing,absorption,consistency,scr,tpp",
                 "--out", str(out), *FAST])
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["suites"] == ["core", "probing", "absorption", "consistency", "scr", "tpp"]
    assert len(m["core"]) == 2 and m["core"][0]["hook_point"] == HOOK
    probing = m["probing"][0]
    assert probing["hook_point"] == HOOK and probing["k"] == [1, 2, 5]
    assert [t["task"] for t in probing["tasks"]] == ["string", "comment", "keyword", "indent_2"]
    assert all(t["n_train_pos"] == t["n_train_neg"] for t in probing["tasks"])
    for s in probing["saes"]:
        assert set(s["sae"]["by_task"]) == {"string", "comment", "keyword", "indent_2"}
        assert len(s["sae"]["mean_accuracy"]) == 3 and len(s["control"]["mean_f1"]) == 3
        assert {"difference", "ci_low", "ci_high"} <= set(s["vs_control"])
    absorption = m["absorption"][0]
    assert absorption["n_examples"] > 0 and len(absorption["saes"]) == 2
    assert m["consistency"]["pairs"][0]["a"] == str(pair[0]) and 0 <= m["consistency"]["pairs"][0]["mcc"] <= 1
    assert m["scr"][0]["pairs"][0]["pair"] == "string+indent_2" and len(m["scr"][0]["saes"][0]["scr"]) == 7
    assert len(m["tpp"][0]["saes"][1]["tpp"]) == 7
    board = {r["sae_path"]: r for r in m["scoreboard"]}
    assert set(board) == set(map(str, pair))
    for r in board.values():
        for key in ("l0", "fvu", "probe_top1_accuracy", "probe_top1_control", "absorption_rate", "scr_top20",
                    "tpp_top20", "consistency_mcc"):
            assert key in r, key
    html = (out / "report.html").read_text()
    # core: density, L0, 2 frontiers; then probing, absorption, consistency, scr, tpp
    assert html.count('<div class="plot">') == 9
    assert "Scoreboard" in html and "Probing tasks" in html and "random control" in html
    cfg = json.loads((out / "eval_config.json").read_text())
    assert cfg["suites"] == m["suites"] and cfg["suite"]["concepts"]["n_tokens"] == 32768


def test_hub_datasets_replace_the_code_concepts(pair, bias_in_bios_folder, tmp_path, capsys):
    out = tmp_path / "hub"
    code = main(["eval", "--sae", str(pair[0]), "--suite", "probing,tpp,scr", "--out", str(out), *FAST,
                 "--probe-dataset", str(bias_in_bios_folder), "--label-column", "profession",
                 "--text-column", "hard_text", "--scr-dataset", str(bias_in_bios_folder),
                 "--scr-columns", "profession,gender", "--scr-values", "21:13,0:1"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["probing"][0]["source"] == f"hub:{bias_in_bios_folder}"
    assert [t["task"] for t in m["probing"][0]["tasks"]] == ["profession=13", "profession=2", "profession=21"]
    assert m["tpp"][0]["tasks"] == ["profession=13", "profession=2", "profession=21"]
    assert m["scr"][0]["pairs"][0]["dataset"] == str(bias_in_bios_folder)
    assert "core" not in m and "absorption" not in m


def test_clear_errors(pair, tiny_gpt2_path, tmp_path, capsys):
    def err(args: list[str]) -> str:
        code = main(["eval", "--out", str(tmp_path / "o"), *FAST, *args])  # args last: they override FAST
        text = capsys.readouterr().err
        assert code == 2, text
        return text

    assert "unknown suite(s) ['probes']" in err(["--sae", str(pair[0]), "--suite", "probes"])
    assert "needs at least two" in err(["--sae", str(pair[0]), "--suite", "consistency"])
    wide = save_sae(tmp_path / "wide", tiny_gpt2_path, seed=3, d_sae=128)
    assert "d_sae=96" in err(["--consistency", str(pair[0]), str(wide)])
    other = save_sae(tmp_path / "other", tiny_gpt2_path, seed=4, hook="blocks.0.hook_resid_post")
    assert "one hook point" in err(["--consistency", str(pair[0]), str(other)])
    # a concept with too few examples of a class in the scan is a task with one class
    assert "task 'fstring' has" in err(["--sae", str(pair[0]), "--suite", "probing", "--concepts", "fstring"])
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.parametrize("suite", ["absorption", "scr", "tpp"])
def test_decoder_suites_refuse_transcoders(tiny_gpt2_path, tmp_path, suite):
    """These suites compare decoder directions with probes of the input; a transcoder's decoder writes its target's
    space (a shape error for d_out ≠ d_in, meaningless numbers otherwise), so it is refused before any compute."""
    from evals.evaluate import EvalConfig, run_eval
    from evals.suites import run_model_suites

    torch.manual_seed(0)
    tc = SparseCoder.from_config(SAEConfig(
        architecture="topk", d_in=32, d_sae=64, k=4, d_out=128, transcoder=True, hook_point="blocks.1.hook_resid_mid",
        target_hook_point="blocks.1.mlp.hook_post", model_name=str(tiny_gpt2_path)))
    tc.save(tmp_path / "tc")
    with pytest.raises(ValueError, match=f"the {suite} suite .* is a transcoder: its decoder writes "
                                         "'blocks.1.mlp.hook_post'"):
        run_eval(EvalConfig(sae_paths=(str(tmp_path / "tc"),), out=str(tmp_path / "o"), suites=("core", suite)))
    with pytest.raises(ValueError, match="is a transcoder"):  # the library entry, before the token scan
        run_model_suites(None, tc.cfg.hook_point, [("tc", tc)], [suite])
    from types import SimpleNamespace

    from evals.absorption import run_absorption
    from evals.scr import run_scr, run_tpp

    run = {"absorption": lambda: run_absorption(torch.zeros(1, 32), None, [("tc", tc)], tc.cfg.hook_point),
           "scr": lambda: run_scr([None], tc.cfg.hook_point, [("tc", tc)]),
           "tpp": lambda: run_tpp(SimpleNamespace(hook_point=tc.cfg.hook_point), [("tc", tc)])}[suite]
    with pytest.raises(ValueError, match="is a transcoder"):  # each suite's own entry point
        run()
    assert not (tmp_path / "o").exists()


def test_parse_suites_and_scoreboard_rows():
    assert parse_suites("core, probing,core") == ("core", "probing")
    with pytest.raises(ValueError, match="valid"):
        parse_suites("")
    rows = scoreboard([{"sae_path": "a", "l0": 3.0, "fvu": 0.1}], {"consistency": {"pairs": [
        {"a": "a", "b": "b", "mcc": 0.7}]}})
    assert rows == [{"sae_path": "a", "hook_point": None, "d_sae": None, "l0": 3.0, "fvu": 0.1,
                     "ce_loss_recovered": None, "consistency_mcc": 0.7, "consistency_with": "b"},
                    {"sae_path": "b", "consistency_mcc": 0.7, "consistency_with": "a"}]


def test_short_concepts_and_scr_pairs_stop_the_eval_before_any_forward_pass(pair, tmp_path, capsys, monkeypatch):
    """The labelled tokens say which concepts and SCR pairs are short: all of them are named in one error before
    the core suite (or a capture) runs, not after minutes of it with nothing written."""
    import evals.evaluate as E
    import evals.tasks as T

    def ran(*args, **kwargs):
        raise AssertionError("a forward pass ran before the short concept / pair was refused")

    monkeypatch.setattr(E, "evaluate_sae", ran)
    monkeypatch.setattr(T, "capture_rows", ran)
    out = tmp_path / "short"
    code = main(["eval", "--sae", str(pair[0]), "--suite", "core,probing,absorption,scr,tpp", "--out", str(out),
                 *FAST, "--probe-tokens", "4096", "--concepts", "string,fstring",
                 "--scr-pairs", "string+indent_2,def_signature+indent_2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "task 'fstring' has 0 positive" in err
    assert "SCR pair (def_signature, indent_2) has quadrant counts {'11': 0," in err and "--probe-tokens" in err
    assert not out.exists()


def test_tpp_with_one_task_is_refused_before_the_core_suite(pair, tmp_path, capsys, monkeypatch):
    import evals.evaluate as E

    def ran(*args, **kwargs):
        raise AssertionError("the core suite ran before TPP's single task was refused")

    monkeypatch.setattr(E, "evaluate_sae", ran)
    code = main(["eval", "--sae", str(pair[0]), "--suite", "core,tpp", "--out", str(tmp_path / "o"), *FAST,
                 "--concepts", "string"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "TPP needs at least two tasks (one intended, others unintended), got ['string']" in err
    assert "--concepts" in err
