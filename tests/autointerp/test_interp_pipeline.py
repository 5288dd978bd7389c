"""The autointerp run end to end on the tiny GPT-2: outputs, resume, failures, LLM cache and the CLI."""
from __future__ import annotations

import dataclasses
import html
import json
import random

import pytest
from fakes import FakeEmbedder, FakeJudge, interp_config, make_sae, records_once, with_records

from autointerp.llm.cache import CachedClient
from autointerp.pipeline import InterpConfig, run_interp
from autointerp.records import RecordConfig

HOOK = "blocks.0.hook_resid_post"
RECORDS = RecordConfig(n_tokens=2048, context_size=32, batch_size=8, window=16, n_top=12, n_sample_pool=8,
                       n_random_negatives=6, n_similar_negatives=4)


@pytest.fixture(scope="module")
def sae(tiny_model):
    return make_sae(d_in=tiny_model.width(HOOK), d_sae=32, k=4, hook=HOOK)


@pytest.fixture(scope="module")
def records_dir(tiny_model, sae, tmp_path_factory):
    return records_once(tmp_path_factory.mktemp("records_seed"), RECORDS, sae, tiny_model)


def _cfg(out, **kw) -> InterpConfig:
    return interp_config(out, **{"records": RECORDS, **kw})


_fresh = with_records


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_offline_outputs_and_dashboard(tmp_path, records_dir, sae):
    out = _fresh(tmp_path, records_dir)
    summary = run_interp(_cfg(out), sae=sae, model=None, embedder=FakeEmbedder())  # no model: records reused
    exps = _jsonl(out / "explanations.jsonl")
    assert sorted(r["latent"] for r in exps) == list(range(8))
    scores = _jsonl(out / "scores.jsonl")
    ok = [r for r in scores if "auroc" in r["scores"]["embedding"]]
    assert ok, scores
    assert summary["scorers"]["embedding"]["n_scored"] == len(ok)
    assert json.loads((out / "summary.json").read_text())["n_latents"] == 8
    page = (out / "dashboard.html").read_text()
    explained = [r for r in exps if r["ok"]]
    assert explained
    assert all(html.escape(r["explanation"]) in page for r in explained)
    assert "rgba(255,90,0," in page and "function filt()" in page


def test_llm_run_resume_and_zero_requests_on_rerun(tmp_path, records_dir, sae):
    out = _fresh(tmp_path, records_dir)
    judge = FakeJudge()
    cfg = _cfg(out, explainer="llm", scorers=("detection", "fuzzing"), llm="fake")
    run_interp(cfg, sae=sae, client=judge)
    n_first = len(judge.calls)
    assert n_first > 0
    scores = _jsonl(out / "scores.jsonl")
    assert any("accuracy" in r["scores"]["detection"] for r in scores)
    # interrupted run: drop the last latent's lines; a resume redoes only that latent
    last = scores[-1]["latent"]
    for name in ("explanations.jsonl", "scores.jsonl"):
        lines = (out / name).read_text().splitlines()
        (out / name).write_text("\n".join(ln for ln in lines if json.loads(ln)["latent"] != last) + "\n")
    judge.calls.clear()
    run_interp(cfg, sae=sae, client=judge)
    assert 0 < len(judge.calls) < n_first
    assert sorted(r["latent"] for r in _jsonl(out / "explanations.jsonl")) == list(range(8))
    judge.calls.clear()
    run_interp(cfg, sae=sae, client=judge)
    assert judge.calls == []  # everything finished: no requests at all


def test_llm_down_and_garbage_become_failure_records(tmp_path, records_dir, sae):
    out = _fresh(tmp_path, records_dir)
    cfg = _cfg(out, explainer="llm", scorers=("detection",), llm="fake")
    summary = run_interp(cfg, sae=sae, client=FakeJudge(mode="down"))
    exps = _jsonl(out / "explanations.jsonl")
    assert len(exps) == 8 and not any(r["ok"] for r in exps)
    assert all("error" in r["scores"]["detection"] for r in _jsonl(out / "scores.jsonl"))
    assert summary["n_explanation_failures"] == 8 and (out / "dashboard.html").exists()
    out2 = _fresh(tmp_path / "g", records_dir)
    run_interp(_cfg(out2, explainer="llm", scorers=("detection",), llm="fake"), sae=sae,
               client=FakeJudge(mode="garbage"))
    assert all(r["raw"] and "no one-line explanation" in r["error"] for r in _jsonl(out2 / "explanations.jsonl")
               if r["error"] != "latent never fired in the records")


def test_scorer_crash_is_a_failure_record(tmp_path, records_dir, sae):
    class Boom(FakeEmbedder):
        def embed(self, texts):
            raise RuntimeError("embedder exploded")

    out = _fresh(tmp_path, records_dir)
    run_interp(_cfg(out), sae=sae, embedder=Boom())
    rows = _jsonl(out / "scores.jsonl")
    assert len(rows) == 8 and all("error" in r["scores"]["embedding"] for r in rows)


def test_config_errors_name_the_options():
    with pytest.raises(ValueError, match="needs an LLM: pass --llm"):
        InterpConfig(sae_path="x", out="y", scorers=("detection",))
    with pytest.raises(ValueError, match="unknown control 'bogus'; valid"):
        InterpConfig(sae_path="x", out="y", control="bogus")


def test_cache_makes_second_run_issue_zero_requests(tmp_path, records_dir, sae):
    judge = FakeJudge()
    for run in range(2):
        out = tmp_path / f"run{run}"
        _fresh(out, records_dir)
        client = CachedClient(judge, str(tmp_path / "llm_cache"))
        summary = run_interp(_cfg(out, explainer="llm", scorers=("detection",), llm="fake"), sae=sae, client=client)
        if run == 1:
            assert summary["llm"]["cache_misses"] == 0 and summary["llm"]["cache_hits"] > 0
        if run == 0:
            assert judge.calls
            judge.calls.clear()
    assert judge.calls == []  # the second run, in a fresh output folder, was served from the cache


def test_cli_end_to_end_offline(tmp_path, tiny_gpt2_path, tiny_model, sae, monkeypatch, capsys):
    from sae_kit.cli import main

    sae_dir = tmp_path / "sae"
    sae.save(sae_dir)
    monkeypatch.setattr("autointerp.scorers.default_embedder", FakeEmbedder)
    out = tmp_path / "out"
    argv = ["interp", "--sae", str(sae_dir), "--model", str(tiny_gpt2_path), "--backend", "transformer_lens",
            "--tokens", "1024", "--latents", "random:5", "--context-size", "32", "--window", "16", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    assert "n_latents" in capsys.readouterr().out
    assert len(_jsonl(out / "explanations.jsonl")) == 5
    for name in ("scores.jsonl", "summary.json", "dashboard.html", "records/records.pt"):
        assert (out / name).exists()
    assert main([*argv[:-1], "--latents", "0:99"]) == 2
    assert "out of bounds" in capsys.readouterr().err


class _CountingFake(FakeEmbedder):
    """FakeEmbedder that counts its `embed` calls and texts."""

    def __init__(self):
        self.calls: list[int] = []

    def embed(self, texts):
        self.calls.append(len(texts))
        return super().embed(texts)


def test_batched_embedding_matches_latent_by_latent_and_resumes(tmp_path, records_dir, sae):
    one = _fresh(tmp_path / "one", records_dir)
    run_interp(_cfg(one), sae=sae, embedder=FakeEmbedder())
    batched = _fresh(tmp_path / "batched", records_dir)
    counting = _CountingFake()
    run_interp(_cfg(batched, embed_chunk=4), sae=sae, embedder=counting)
    by_latent = {r["latent"]: r for r in _jsonl(one / "scores.jsonl")}
    assert {r["latent"]: r for r in _jsonl(batched / "scores.jsonl")} == by_latent
    assert any("auroc" in r["scores"]["embedding"] for r in by_latent.values())
    assert len(counting.calls) == 2  # 8 latents in chunks of 4: one embedding call per chunk
    # an interrupted batched run resumes with the last latent only; finished rows stay as they were
    last = max(by_latent)
    kept = [ln for ln in (batched / "scores.jsonl").read_text().splitlines() if json.loads(ln)["latent"] != last]
    (batched / "scores.jsonl").write_text("\n".join(kept) + "\n")
    counting.calls.clear()
    run_interp(_cfg(batched, embed_chunk=4), sae=sae, embedder=counting)
    rows = _jsonl(batched / "scores.jsonl")
    assert [json.dumps(r) for r in rows[:-1]] == kept and rows[-1] == by_latent[last]
    assert len(counting.calls) <= 1


CAUSES = {("down", "detection"): "connection refused", ("down", "fuzzing"): "connection refused",
          ("down", "intervention"): "connection refused", ("garbage", "detection"): "expected a list",
          ("garbage", "fuzzing"): "expected a list", ("garbage", "intervention"): "unparseable reply"}


@pytest.mark.parametrize("scorer", ["detection", "fuzzing", "intervention"])
@pytest.mark.parametrize("mode", ["down", "garbage"])
def test_every_llm_scorer_records_failures_and_keeps_finished_latents(tmp_path, records_dir, sae, tiny_model,
                                                                      scorer, mode):
    out = _fresh(tmp_path, records_dir)
    # the baseline explainer needs no LLM, so every failure below is the scorer's
    cfg = _cfg(out, scorers=("embedding", scorer), llm="fake")
    summary = run_interp(cfg, sae=sae, model=tiny_model, client=FakeJudge(mode=mode), embedder=FakeEmbedder())
    rows = _jsonl(out / "scores.jsonl")
    explained = [r for r in rows if r["explanation"]]
    assert len(rows) == 8 and explained
    assert all("error" in r["scores"][scorer] for r in rows)
    assert summary["scorers"][scorer]["n_failed"] == 8 and summary["scorers"][scorer]["n_scored"] == 0
    scorable = [r for r in explained if "auroc" in r["scores"]["embedding"]]  # the other scorer still scored
    assert scorable and all(CAUSES[mode, scorer] in r["scores"][scorer]["error"] for r in scorable)
    # with retry_failed off a resume keeps the failures as finished latents
    judge = FakeJudge(mode="judge")
    run_interp(dataclasses.replace(cfg, retry_failed=False), sae=sae, model=tiny_model, client=judge,
               embedder=FakeEmbedder())
    assert judge.calls == [] and _jsonl(out / "scores.jsonl") == rows
    # by default a resume, the LLM now healthy, redoes the LLM failures and keeps everything else
    summary = run_interp(cfg, sae=sae, model=tiny_model, client=judge, embedder=FakeEmbedder())
    after = _jsonl(out / "scores.jsonl")
    assert judge.calls and [r["latent"] for r in after] == list(range(8))
    assert [r["scores"]["embedding"] for r in after] == [r["scores"]["embedding"] for r in rows]
    assert not any(CAUSES[mode, scorer] in r["scores"][scorer].get("error", "") for r in after)
    rescored = [r for r in after if "error" not in r["scores"][scorer]]
    assert rescored and summary["scorers"][scorer]["n_scored"] == len(rescored)
    assert summary["scorers"][scorer]["n_failed"] == 8 - len(rescored)


def test_context_longer_than_the_model_is_refused_before_records(tmp_path, sae, tiny_model, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("records were built")

    monkeypatch.setattr("autointerp.pipeline.collect_records", never)
    too_long = dataclasses.replace(RECORDS, context_size=tiny_model.n_ctx + 1)
    with pytest.raises(ValueError, match=f"context_size {tiny_model.n_ctx + 1} exceeds .* at most {tiny_model.n_ctx}"):
        run_interp(_cfg(tmp_path, records=too_long), sae=sae, model=tiny_model, embedder=FakeEmbedder())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("spec", ["http://127.0.0.1:{port}/v1:m", "local:/nonexistent/model"])
def test_unusable_llm_fails_before_anything_is_loaded_or_computed(tmp_path, monkeypatch, spec):
    def never(*args, **kwargs):
        raise AssertionError("the run went on past the LLM check")

    for name in ("_load_sae", "_records", "collect_records"):
        monkeypatch.setattr(f"autointerp.pipeline.{name}", never)
    spec = spec.format(port=_free_port())
    with pytest.raises(ValueError, match="is not reachable: (cannot connect|no local model)"):
        run_interp(_cfg(tmp_path, explainer="llm", scorers=("detection",), llm=spec))


def test_local_llm_that_does_not_load_is_a_one_line_error(tmp_path):
    from autointerp.llm.local import LocalChatClient

    with pytest.raises(ValueError, match="cannot load the local LLM '.*nothing'") as err:
        LocalChatClient(str(tmp_path / "nothing"))
    assert "\n" not in str(err.value)


def test_cli_exits_non_zero_when_every_latent_failed(tmp_path, tiny_gpt2_path, sae, monkeypatch, capsys):
    from sae_kit.cli import main

    sae_dir = tmp_path / "sae"
    sae.save(sae_dir)
    monkeypatch.setattr("autointerp.llm.check.endpoint_problem", lambda spec: None)  # "reachable", then down
    monkeypatch.setattr("autointerp.llm.make_client", lambda spec, cache_dir=None: FakeJudge(mode="down"))
    monkeypatch.setattr("autointerp.scorers.default_embedder", FakeEmbedder)
    argv = ["interp", "--sae", str(sae_dir), "--model", str(tiny_gpt2_path), "--backend", "transformer_lens",
            "--tokens", "512", "--latents", "0:3", "--context-size", "32", "--window", "16", "--explainer", "llm",
            "--llm", "http://127.0.0.1:1/v1:m", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sae-kit interp")]
    assert len(err) == 1 and "every one of the 3 latents failed" in err[0]


def test_records_come_from_the_dataset_the_sae_records(tmp_path, tiny_gpt2_path, sae, monkeypatch, capsys):
    """With no --dataset, interp reads the SAE's own training text (path and text column from its metadata),
    as evals do; before, it read the stdlib whatever the SAE was trained on."""
    import activation_store.tokens as tokens
    from sae_kit.cli import main

    data = tmp_path / "docs.jsonl"
    rng = random.Random(0)
    words = "zebra okapi giraffe lion ant bee cat dog elk fox gnu hen ibis jay kiwi lynx mole newt owl pig".split()
    data.write_text("".join(json.dumps({"content": " ".join(rng.choice(words) for _ in range(60))}) + "\n"
                            for _ in range(200)))
    trained = dataclasses.replace(sae.cfg, metadata={"dataset": {
        "path": str(data), "text_column": "content", "context_size": 128, "split": "train", "eval_percent": 10}})
    sae_dir = tmp_path / "sae"
    type(sae)(trained).save(sae_dir)
    read: list = []
    real = tokens.iter_token_batches
    monkeypatch.setattr(tokens, "iter_token_batches", lambda tok, cfg, *a, **kw: read.append(cfg) or real(tok, cfg, *a, **kw))
    monkeypatch.setattr("autointerp.scorers.default_embedder", FakeEmbedder)
    out = tmp_path / "out"
    argv = ["interp", "--sae", str(sae_dir), "--model", str(tiny_gpt2_path), "--backend", "transformer_lens",
            "--tokens", "1024", "--latents", "0:4", "--context-size", "32", "--window", "16", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert read and {(c.path, c.text_column, c.eval_percent, c.context_size) for c in read} == {
        (str(data), "content", 10, 32)}
    recorded = json.loads((out / "run.json").read_text())["fingerprint"]["dataset"]
    assert recorded == {"path": str(data), "text_column": "content", "eval_percent": 10}

    # --dataset picks another text; the recorded column does not follow it, --text-column sets one
    read.clear()
    assert main([*argv[:-3], "--out", str(tmp_path / "std"), "--dataset", "stdlib", "--no-progress"]) == 0
    assert {(c.path, c.text_column) for c in read} == {("stdlib", "text")}
    assert json.loads((tmp_path / "std" / "run.json").read_text())["fingerprint"]["dataset"] == "stdlib"


def test_an_sae_recording_no_dataset_reads_stdlib_with_a_warning(sae, caplog):
    from autointerp.pipeline import interp_dataset

    with caplog.at_level("WARNING"):
        dataset = interp_dataset(_cfg("unused"), sae.cfg)
    assert (dataset.path, dataset.context_size) == ("stdlib", RECORDS.context_size)
    assert "records no training dataset" in caplog.text
