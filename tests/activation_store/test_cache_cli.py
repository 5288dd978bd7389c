"""`sae-kit cache`: flags map onto CacheConfig, the store is written, bad input is one clear line."""
from __future__ import annotations

import errno
import json

import pytest
import torch

from activation_store import storage as storage_mod
from activation_store.store import ActivationStore
from sae_kit.cli import main


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"def f{i}(x):\n    return x * {i}\n" * 4}) + "\n" for i in range(40)))
    return path


def args(model, docs, out, *extra):
    return ["cache", "--model", str(model), "--backend", "transformer_lens", "--dataset", str(docs),
            "--text-column", "body", "--context-size", "16", "--batch-size", "2", "--shard-tokens", "64",
            "--out", str(out), *extra]


def test_cache_writes_store_and_resumes(tiny_gpt2_path, docs, tmp_path, capsys):
    out = tmp_path / "store"
    argv = args(tiny_gpt2_path, docs, out, "--hook", "blocks.0.hook_resid_post", "--hook",
                "blocks.1.attn.hook_z", "--tokens", "200", "--dtype", "float16", "--no-exclude-special")
    assert main(argv) == 0
    assert "complete" in capsys.readouterr().out
    store = ActivationStore.open(str(out))
    assert store.hook_points == ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    assert store.n_rows == 13 * 16  # 200 tokens → 13 contexts, specials kept
    assert len(store.manifest["shards"]) == 4  # 64 tokens = 2 forward batches of 2 contexts per shard
    m = store.manifest
    assert m["dtype"] == "float16" and m["dataset"]["text_column"] == "body" and m["context_size"] == 16
    from transformers import AutoTokenizer

    assert m["tokenizer"]["vocab_size"] == len(AutoTokenizer.from_pretrained(tiny_gpt2_path))
    assert len(m["tokenizer"]["tokenizer_json_sha256"]) == 64
    assert m["dataset"]["files"] == [str(docs)]
    batch = next(store.batches(["blocks.1.attn.hook_z"], batch_size=8, dtype=torch.float16))
    assert batch["blocks.1.attn.hook_z"].shape == (8, 32) and batch["blocks.1.attn.hook_z"].dtype == torch.float16
    assert main(argv) == 0  # complete: nothing to redo
    assert main(args(tiny_gpt2_path, docs, out, "--tokens", "400")) == 2
    assert "differing fields" in capsys.readouterr().err


def test_cache_bad_input_is_one_line(tiny_gpt2_path, docs, tmp_path, capsys):
    assert main(args(tiny_gpt2_path, docs, tmp_path / "a", "--tokens", "0")) == 2
    assert "n_tokens must be a positive integer, got 0" in capsys.readouterr().err
    assert main(args(tiny_gpt2_path, docs, tmp_path / "b", "--hook", "blocks.9.hook_resid_post")) == 2
    err = capsys.readouterr().err
    assert err.count("sae-kit cache: error: unknown hook point 'blocks.9.hook_resid_post'") == 1
    assert "Traceback" not in err
    assert main(args(tiny_gpt2_path, docs, tmp_path / "c", "--text-column", "text",
                     "--hook", "blocks.0.hook_resid_post")) == 2
    assert "no text column 'text'" in capsys.readouterr().err


def test_cache_disk_full_exits_cleanly(tiny_gpt2_path, docs, tmp_path, capsys, monkeypatch):
    def full(f, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_mod, "_write_all", full)
    assert main(args(tiny_gpt2_path, docs, tmp_path / "s", "--tokens", "64",
                     "--hook", "blocks.0.hook_resid_post")) == 1
    assert "No space left" in capsys.readouterr().err
    assert not list((tmp_path / "s").rglob("*")) if (tmp_path / "s").exists() else True


def test_cache_mistyped_dataset_path_is_one_line(tiny_gpt2_path, tmp_path, capsys):
    typo = tmp_path / "data" / "typo.jsonl"
    assert main(args(tiny_gpt2_path, typo, tmp_path / "s", "--hook", "blocks.0.hook_resid_post")) == 2
    err = capsys.readouterr().err  # named before the model loads: no progress bar precedes it
    assert err.strip() == (f"sae-kit cache: error: no such file or folder '{typo}'; a local dataset is an existing "
                           ".txt/.jsonl/.json/.parquet file or a folder of them (hub datasets are named like 'owner/name')")


def test_cache_single_text_file_and_eval_percent(tiny_gpt2_path, tmp_path, capsys):
    text = tmp_path / "one.txt"
    text.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i}" for i in range(40)) + "\n")
    hook = ("--text-column", "text", "--hook", "blocks.0.hook_resid_post", "--tokens", "64")
    assert main(args(tiny_gpt2_path, text, tmp_path / "train", *hook)) == 0
    assert main(args(tiny_gpt2_path, text, tmp_path / "all", *hook, "--eval-percent", "0")) == 0
    assert ActivationStore.open(str(tmp_path / "all")).manifest["config"]["dataset"]["eval_percent"] == 0
    train, everything = (ActivationStore.open(str(tmp_path / s)).row_tokens().doc_ids for s in ("train", "all"))
    assert not torch.equal(train, everything)  # some paragraphs are held out only by default


def test_cache_refuses_to_resume_a_text_store_cut_the_old_way(tiny_gpt2_path, tmp_path, capsys):
    """A store started when a text file was one document would resume with other documents."""
    text = tmp_path / "one.txt"
    text.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i}" for i in range(40)) + "\n")
    argv = args(tiny_gpt2_path, text, tmp_path / "s", "--text-column", "text", "--hook", "blocks.0.hook_resid_post",
                "--tokens", "128")
    assert main(argv) == 0
    storage = storage_mod.Storage(str(tmp_path / "s"))
    manifest = storage.read_json("manifest.json")
    manifest["complete"] = False
    del manifest["dataset"]["text_sample_by"]
    storage.write_json_atomic("manifest.json", manifest)
    assert main(argv) == 2
    assert "dataset.text_sample_by: stored None, requested 'paragraph'" in capsys.readouterr().err


def test_no_progress_hides_the_bar_as_in_every_other_command(tiny_gpt2_path, docs, tmp_path, capsys):
    argv = args(tiny_gpt2_path, docs, tmp_path / "store", "--hook", "blocks.0.hook_resid_post", "--tokens", "64")
    assert main([*argv, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "complete" in captured.out and "tok/s" not in captured.err


def test_dataset_config_reaches_the_dataset():
    # A hub dataset with configurations (fineweb's sample-10BT, the shipped gpt2 run's) is reachable from the CLI.
    from activation_store.cli_cache import config_from_args
    from sae_kit.cli import build_parser

    parsed = build_parser("cache").parse_args(["cache", "--dataset", "HuggingFaceFW/fineweb", "--dataset-config",
                                               "sample-10BT"])
    assert config_from_args(parsed).dataset.name == "sample-10BT"
    assert config_from_args(build_parser("cache").parse_args(["cache"])).dataset.name is None
