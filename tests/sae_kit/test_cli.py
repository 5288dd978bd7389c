"""Every command turns a model that cannot be loaded into one clear line, and refuses an SAE trained on another
model before loading any weights."""
from __future__ import annotations

from pathlib import Path

import pytest

from sae_kit.cli import main
from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.sae.base import WEIGHTS_FILENAME

MISSING = "no-such-org/no-such-model"
HOOK = "blocks.0.hook_resid_post"


def save_sae(folder: Path, model_name: str) -> Path:
    SparseCoder.from_config(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hook_point=HOOK,
                                      model_name=model_name)).save(folder)
    return folder


def one_error_line(command: str, argv: list[str], capsys) -> str:
    code = main([command, *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("sae-kit ")]
    assert len(lines) == 1 and lines[0].startswith(f"sae-kit {command}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def sae_of_missing_model(tmp_path_factory) -> Path:
    return save_sae(tmp_path_factory.mktemp("sae") / "sae", MISSING)


@pytest.mark.parametrize("command", ["hooks", "cache", "train", "eval", "interp", "steer"])
def test_a_model_that_cannot_be_loaded_is_one_line_saying_what_to_do(command, sae_of_missing_model, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sae = str(sae_of_missing_model)
    argv = {
        "hooks": ["--model", MISSING],
        "cache": ["--model", MISSING, "--tokens", "64", "--out", str(tmp_path / "acts")],
        "train": ["--model", MISSING, "--hook", HOOK, "--tokens", "1024", "--out", str(tmp_path / "sae")],
        "eval": ["--sae", sae, "--model", MISSING, "--out", str(tmp_path / "eval"), "--no-progress"],
        "interp": ["--sae", sae, "--out", str(tmp_path / "interp"), "--no-progress"],
        "steer": ["--sae", sae, "--feature", "1"],
    }[command]
    line = one_error_line(command, argv, capsys)
    assert f"could not load model '{MISSING}'" in line
    assert "is no local folder" in line and "HF_HUB_OFFLINE" in line  # what was looked for
    assert "save_pretrained" in line and "--model reference" in line  # what to do


@pytest.mark.parametrize("command", ["eval", "interp", "steer"])
def test_an_sae_of_another_model_is_refused_before_any_weights_load(command, tiny_gpt2_path, tiny_llama_path,
                                                                    tmp_path, monkeypatch, capsys):
    sae = save_sae(tmp_path / "sae", str(tiny_gpt2_path))
    (sae / WEIGHTS_FILENAME).unlink()  # any attempt to load the weights would fail with another message

    def no_model(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("activation_store.model.load_model", no_model)
    monkeypatch.setattr("evals.evaluate.load_model", no_model)
    argv = {"eval": ["--out", str(tmp_path / "eval")], "interp": ["--out", str(tmp_path / "interp")],
            "steer": ["--feature", "1"]}[command]
    line = one_error_line(command, ["--sae", str(sae), "--model", str(tiny_llama_path), *argv], capsys)
    assert f"was trained on model '{tiny_gpt2_path}'" in line and f"model '{tiny_llama_path}' was requested" in line


@pytest.mark.parametrize("command", ["hooks", "cache", "train", "eval", "interp", "steer", "convert", "push", "run"])
def test_every_flag_with_a_default_says_it_in_help(command):
    # A default only the code knows is a default the reader guesses: --help states each one.
    import argparse

    from sae_kit.cli import build_parser

    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    silent = [a.option_strings[-1] for a in sub._actions
              if a.option_strings and a.default is not None and not isinstance(a.default, bool)
              and a.default not in (argparse.SUPPRESS, []) and "default" not in (a.help or "")]
    assert not silent, f"sae-kit {command}: flags whose --help hides their default: {silent}"


@pytest.mark.parametrize("command, argv, says", [
    ("cache", ["--out", "acts"], "the finished shards in acts are kept, and re-running the same command continues"),
    ("eval", ["--sae", "s", "--out", "ev"], "an eval does not resume (ev/metrics.json is written only when it"),
    ("interp", ["--sae", "s", "--out", "ip"], "the latents finished so far are kept in ip, and re-running the same"),
    ("run", [], "re-running the same command skips the finished pieces and resumes the interrupted one"),
    ("train", ["--out", "o"], "interrupted before training started; nothing was written (re-run the same command)"),
    ("steer", ["--sae", "s", "--feature", "1"], "interrupted"),
])
def test_ctrl_c_is_one_line_saying_what_a_rerun_does_and_exit_130(command, argv, says, monkeypatch, capsys):
    import importlib

    from sae_kit.cli import SUBCOMMANDS

    def stopped(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(SUBCOMMANDS[command][0]), "run", stopped)
    monkeypatch.delenv("RANK", raising=False)
    assert main([command, *argv]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"sae-kit {command}: interrupted") and says in err, err
    if command == "run":  # interrupted in a training pass: how far it got
        from sae_kit.train.loop import TrainingInterrupted

        def stopped_training(args):
            raise TrainingInterrupted(40, 100, Path("o/.checkpoints/step_000000032"), 4096)

        monkeypatch.setattr(importlib.import_module(SUBCOMMANDS[command][0]), "run", stopped_training)
        assert main([command, *argv]) == 130
        assert capsys.readouterr().err.startswith("sae-kit run: interrupted while training, at step 40 of 100 (last "
                                                  "checkpoint step 32); re-running the same command skips")
    # Under torchrun every rank is interrupted: rank 0 speaks for all, every rank exits 130.
    monkeypatch.setenv("RANK", "1")
    assert main([command, *argv]) == 130
    assert capsys.readouterr().err == ""
