"""Resuming `sae-kit interp` safely: run.json refuses other settings, --overwrite starts over, failed latents
are retried once, finished ones never redone, and a killed run corrupts neither results nor records."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fakes import FakeEmbedder, FakeJudge, LLMError, LLMResponse, interp_config, make_sae, records_once, with_records

from autointerp.pipeline import InterpConfig, run_interp
from autointerp.records import RecordConfig, load_records, save_records

HOOK = "blocks.0.hook_resid_post"
# Wide and sparse enough that every latent has non-activating contexts, so each one can be scored.
RECORDS = RecordConfig(n_tokens=2048, context_size=16, batch_size=8, window=16, n_top=20, n_sample_pool=12,
                       n_random_negatives=6, n_similar_negatives=4)
DEAD = 3
"""A latent that never fires (its encoder bias rules it out)."""
RESULTS = ("run.json", "explanations.jsonl", "scores.jsonl")


def _sae(tiny_model, seed: int):
    sae = make_sae(d_in=tiny_model.width(HOOK), d_sae=64, k=2, hook=HOOK, seed=seed)
    with torch.no_grad():
        sae.b_enc[DEAD] = -1e4
    return sae


@pytest.fixture(scope="module")
def sae(tiny_model):
    return _sae(tiny_model, seed=0)


@pytest.fixture(scope="module")
def other_sae(tiny_model):
    """The same architecture retrained: other weights."""
    return _sae(tiny_model, seed=1)


@pytest.fixture(scope="module")
def records_dir(tiny_model, sae, tmp_path_factory):
    return records_once(tmp_path_factory.mktemp("resume_records"), RECORDS, sae, tiny_model)


def _cfg(out, **kw) -> InterpConfig:
    return interp_config(out, **{"records": RECORDS, **kw})


_fresh = with_records


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in (*RESULTS, "records/meta.json")}


class RecordingEmbedder(FakeEmbedder):
    """FakeEmbedder that remembers every text it embedded."""

    def __init__(self):
        self.texts: list[str] = []

    def embed(self, texts):
        self.texts += texts
        return super().embed(texts)


@dataclass
class OutageJudge(FakeJudge):
    """FakeJudge whose explanations carry a tag of the explainer prompt (so later requests name their latent).

    While `down`, of the latents in the order it is first asked to explain them, the 1st, 5th, 9th … get no
    explanation, every scoring request about the 2nd, 6th … fails (LLMError), the first one about the 3rd, 7th …
    fails; the rest are answered.
    """

    down: bool = True
    kinds: dict[str, int] = field(default_factory=dict)
    """tag → 0: explaining fails, 1: scoring fails, 2: one scoring request fails, 3: answered (while down)."""
    requests: list[tuple[str, str]] = field(default_factory=list)
    """(tag, "explain" | "score") of every request, failed ones included."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def complete(self, messages, *, max_tokens=256, temperature=0.0):
        """Fail or answer one request."""
        user = messages[-1]["content"]
        if "Excerpts where the latent activates" in user:
            tag, what = hashlib.sha256(user.encode()).hexdigest()[:8], "explain"
        else:
            tag, what = re.search(r"\btag([0-9a-f]{8}) spam", user).group(1), "score"
        with self.lock:  # latents are processed in threads
            first_score = what == "score" and (tag, what) not in self.requests
            self.requests.append((tag, what))
            kind = self.kinds.setdefault(tag, len(self.kinds) % 4) if self.down else 3
        if (kind, what) in ((0, "explain"), (1, "score")) or (kind == 2 and first_score):
            raise LLMError("connection refused (fake outage)")
        if what == "explain":
            return LLMResponse(f"Explanation: tag{tag} spam")
        return super().complete(messages, max_tokens=max_tokens, temperature=temperature)


def test_other_settings_are_refused_naming_each_field(tmp_path, records_dir, sae, other_sae, tiny_model):
    out = _fresh(tmp_path, records_dir)
    run_interp(_cfg(out), sae=sae, embedder=FakeEmbedder())
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"latents: was '0:8', now '0:4'.*another --out.*--overwrite") as err:
        run_interp(_cfg(out, latents="0:4"), sae=sae, model=tiny_model, embedder=FakeEmbedder())
    assert "sae:" not in str(err.value)
    with pytest.raises(ValueError, match=r"sae: was sha256 [0-9a-f]{12}…, now sha256 [0-9a-f]{12}…") as err:
        run_interp(_cfg(out), sae=other_sae, model=tiny_model, embedder=FakeEmbedder())
    assert "latents" not in str(err.value)
    with pytest.raises(ValueError) as err:  # every difference is named, nested settings by their path
        run_interp(_cfg(out, control="random-directions", records=dataclasses.replace(RECORDS, n_tokens=1024),
                        explainer="llm", llm="fake"), sae=sae, model=tiny_model, client=FakeJudge())
    for part in ("control: was 'none', now 'random-directions'", "records.n_tokens: was 2048, now 1024",
                 "explainer.name: was 'baseline', now 'llm'", "explainer.llm: was None, now 'fake'"):
        assert part in str(err.value)
    assert _snapshot(out) == before  # refused before anything was touched, records included
    # settings that do not change results may differ on a resume; nothing is left to do
    embedder = RecordingEmbedder()
    run_interp(_cfg(out, workers=1, embed_chunk=4, live_tokens=999, device="cpu", progress=False), sae=sae,
               embedder=embedder)
    assert embedder.texts == [] and _snapshot(out) == before


def test_folder_with_results_but_no_run_json_is_refused(tmp_path, records_dir, sae):
    out = _fresh(tmp_path, records_dir)
    run_interp(_cfg(out), sae=sae, embedder=FakeEmbedder())
    (out / "run.json").unlink()  # as an older sae-kit left it
    with pytest.raises(ValueError, match="holds results but no run.json"):
        run_interp(_cfg(out), sae=sae, embedder=FakeEmbedder())
    run_interp(_cfg(out, overwrite=True), sae=sae, embedder=FakeEmbedder())
    assert (out / "run.json").exists()


def test_overwrite_replaces_results_and_deletes_nothing_else(tmp_path, records_dir, sae, other_sae, tiny_model):
    out = _fresh(tmp_path / "reused", records_dir)
    run_interp(_cfg(out), sae=sae, embedder=FakeEmbedder())
    old = _jsonl(out / "explanations.jsonl")
    (out / "notes.txt").write_text("mine")
    (out / ".summary.json.old.tmp").write_text("mine")  # only looks like a temporary of ours
    (out / ".scores.jsonl.tmp-k1lled00.tmp").write_text("{")  # what a killed rewrite leaves
    (out / "llm_cache").mkdir()
    (out / "llm_cache" / "entry.json").write_text("{}")
    run_interp(_cfg(out, overwrite=True), sae=other_sae, model=tiny_model, embedder=FakeEmbedder())
    fresh = tmp_path / "fresh"
    run_interp(_cfg(fresh), sae=other_sae, model=tiny_model, embedder=FakeEmbedder())
    assert _jsonl(out / "explanations.jsonl") != old  # the other SAE's latents do read differently
    assert _snapshot(out) == _snapshot(fresh)  # exactly what a run into an empty folder writes
    assert (out / "notes.txt").read_text() == "mine" and (out / "llm_cache" / "entry.json").exists()
    assert (out / ".summary.json.old.tmp").read_text() == "mine"
    assert not (out / ".scores.jsonl.tmp-k1lled00.tmp").exists()
    run_interp(_cfg(out), sae=other_sae, embedder=FakeEmbedder())  # and it resumes like any folder


def test_outage_then_resume_retries_only_failed_latents_once(tmp_path, sae, tiny_model, caplog):
    out = tmp_path
    cfg = _cfg(out, latents="0:10", explainer="llm", scorers=("detection", "embedding"), llm="fake")
    judge = OutageJudge()
    first = run_interp(cfg, sae=sae, model=tiny_model, client=judge, embedder=FakeEmbedder())
    exps = {r["latent"]: r for r in _jsonl(out / "explanations.jsonl")}
    rows = {r["latent"]: r for r in _jsonl(out / "scores.jsonl")}
    no_exp = {lat for lat, r in exps.items() if "connection refused" in (r["error"] or "")}
    no_det = {lat for lat, r in rows.items()
              if "connection refused" in r["scores"]["detection"].get("error", "")} - no_exp
    partial = {lat for lat, r in rows.items() if r["scores"]["detection"].get("failed_prompts")}
    fine = set(range(10)) - no_exp - no_det - partial - {DEAD}
    assert (len(no_exp), len(no_det), len(partial), len(fine)) == (3, 2, 2, 2)
    assert exps[DEAD]["error"] == "latent never fired in the records"
    assert first["scorers"]["detection"]["n_failed"] == 6 and first["scorers"]["embedding"]["n_failed"] == 4

    judge.down, judge.requests = False, []
    embedder = RecordingEmbedder()
    second = run_interp(cfg, sae=sae, client=judge, embedder=embedder)
    explained_ok = no_det | partial | fine
    tags = {lat: re.search(r"tag([0-9a-f]{8})", exps[lat]["explanation"]).group(1) for lat in explained_ok}
    failed_tags = {t for t, kind in judge.kinds.items() if kind == 0}
    explained = [t for t, what in judge.requests if what == "explain"]
    assert sorted(explained) == sorted(failed_tags)  # each failed explanation asked for once, nothing else
    assert {t for t, what in judge.requests if what == "score"} == \
        failed_tags | {tags[lat] for lat in no_det | partial}
    # explanations that were fine are not embedded again: the embedding scorer ran on the new ones only
    assert not {exps[lat]["explanation"] for lat in explained_ok} & set(embedder.texts)

    exps2, rows2 = _jsonl(out / "explanations.jsonl"), _jsonl(out / "scores.jsonl")
    assert [r["latent"] for r in exps2] == [r["latent"] for r in rows2] == list(range(10))  # each exactly once
    for r in rows2:
        if r["latent"] != DEAD:
            det = r["scores"]["detection"]
            assert "accuracy" in det and det["failed_prompts"] == 0 and "auroc" in r["scores"]["embedding"], r
    for lat in fine:
        assert rows2[lat] == rows[lat] and exps2[lat] == exps[lat]
    for lat in no_det | partial:
        assert exps2[lat] == exps[lat] and rows2[lat]["scores"]["embedding"] == rows[lat]["scores"]["embedding"]
    assert rows2[DEAD] == rows[DEAD]  # a dead latent fails the same way every time
    assert (second["n_latents"], second["n_explained"], second["n_explanation_failures"]) == (10, 9, 1)
    for name in ("detection", "embedding"):
        assert (second["scorers"][name]["n_scored"], second["scorers"][name]["n_failed"]) == (9, 1)

    # the same settings again: nothing to redo (the dead latent included), not one request, files untouched
    before = _snapshot(out)
    judge.requests.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="autointerp.pipeline"):
        run_interp(cfg, sae=sae, client=judge, embedder=embedder)
    assert judge.requests == [] and _snapshot(out) == before
    assert "10 of 10 latents already finished" in caplog.text and "retrying" not in caplog.text


def test_added_scorer_runs_alone_and_a_scorer_keeps_its_judge(tmp_path, records_dir, sae):
    out = _fresh(tmp_path, records_dir)
    run_interp(_cfg(out), sae=sae, embedder=FakeEmbedder())
    before = {r["latent"]: r for r in _jsonl(out / "scores.jsonl")}
    judge, embedder = FakeJudge(), RecordingEmbedder()
    summary = run_interp(_cfg(out, scorers=("embedding", "detection"), llm="fake"), sae=sae, client=judge,
                         embedder=embedder)
    assert judge.calls and embedder.texts == []  # only the new scorer ran
    rows = _jsonl(out / "scores.jsonl")
    assert [r["scores"]["embedding"] for r in rows] == [before[r["latent"]]["scores"]["embedding"] for r in rows]
    assert summary["scorers"]["detection"]["n_scored"] == 7
    assert json.loads((out / "run.json").read_text())["fingerprint"]["scorers"] == {
        "embedding": {}, "detection": {"llm": "fake"}}
    with pytest.raises(ValueError, match=r"scorers\.detection\.llm: was 'fake', now 'other'"):
        run_interp(_cfg(out, scorers=("detection",), llm="other"), sae=sae, client=judge)
    # leaving a scorer out is fine, and loses none of its results
    run_interp(_cfg(out), sae=sae, embedder=FakeEmbedder())
    assert _jsonl(out / "scores.jsonl") == rows


def test_line_cut_short_by_a_kill_is_redone_not_joined(tmp_path, records_dir, sae):
    out = _fresh(tmp_path, records_dir)
    run_interp(_cfg(out), sae=sae, embedder=FakeEmbedder())
    rows = _jsonl(out / "scores.jsonl")
    text = (out / "scores.jsonl").read_text()
    (out / "scores.jsonl").write_text(text[: len(text) - len(text.splitlines()[-1]) // 2])  # killed mid-line
    embedder = RecordingEmbedder()
    run_interp(_cfg(out), sae=sae, embedder=embedder)
    assert _jsonl(out / "scores.jsonl") == rows  # every line whole again, the cut latent redone
    assert embedder.texts  # it was redone, not found somewhere


@dataclass
class InterruptedJudge(FakeJudge):
    """FakeJudge that raises KeyboardInterrupt (Ctrl-C) on its second explanation request; later ones are slow, so
    the run has time to stop before them."""

    explained: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def complete(self, messages, *, max_tokens=256, temperature=0.0):
        """Answer, or be interrupted."""
        if "Excerpts where the latent activates" in messages[-1]["content"]:
            with self.lock:
                self.explained += 1
                n = self.explained
            if n == 2:
                raise KeyboardInterrupt
            if n > 2:
                threading.Event().wait(0.5)
        return super().complete(messages, max_tokens=max_tokens, temperature=temperature)


def test_interrupt_stops_asking_the_llm_about_latents_not_started(tmp_path, records_dir, sae):
    out = _fresh(tmp_path / "out", records_dir)
    judge = InterruptedJudge()
    with pytest.raises(KeyboardInterrupt):
        run_interp(_cfg(out, explainer="llm", scorers=("detection",), llm="fake", workers=2), sae=sae, client=judge)
    # Only the latents in flight finish: the other worker's one; asking about all 8 would spend on results
    # nobody writes.
    assert judge.explained <= 4


def test_random_sample_larger_than_the_live_latents_warns(tmp_path, tiny_model, sae, caplog):
    with caplog.at_level(logging.WARNING, logger="autointerp.pipeline"):
        summary = run_interp(_cfg(tmp_path / "out", latents="random:64"), sae=sae, model=tiny_model,
                             embedder=FakeEmbedder())
    assert summary["n_latents"] < 64  # the dead latent never fires
    assert f"only {summary['n_latents']} of 64 latents fired" in caplog.text


def test_killed_records_save_never_pairs_new_records_with_old_meta(tmp_path, records_dir, monkeypatch):
    folder = tmp_path / "records"
    shutil.copytree(records_dir, folder)
    meta = json.loads((folder / "meta.json").read_text())
    meta.pop("vocab")
    state, _ = load_records(folder, meta)
    old_bytes = (folder / "records.pt").read_bytes()

    class Tokenizer:
        def decode(self, ids):
            return "x"

    def killed(obj, f):
        if hasattr(f, "write"):  # saved through a file object (so the archive is not named after the temporary)
            f.write(b"half a file")
        else:
            Path(f).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_records(folder, state, Tokenizer(), {**meta, "latents": "8:16"})
    assert load_records(folder, meta) is None  # the old settings no longer match what might be on disk
    assert (folder / "records.pt").read_bytes() == old_bytes and sorted(p.name for p in folder.iterdir()) == [
        "records.pt"]  # no partial file, no temp file left


def test_cli_refuses_a_retrained_sae_until_overwrite(tmp_path, tiny_gpt2_path, tiny_model, sae, other_sae,
                                                      monkeypatch, capsys):
    from sae_kit.cli import main

    monkeypatch.setattr("autointerp.scorers.default_embedder", FakeEmbedder)
    sae_dir, out = tmp_path / "sae", tmp_path / "out"
    sae.save(sae_dir)
    argv = ["interp", "--sae", str(sae_dir), "--model", str(tiny_gpt2_path), "--backend", "transformer_lens",
            "--tokens", "1024", "--latents", "0:4", "--context-size", "16", "--window", "16", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    first = json.loads((out / "run.json").read_text())["fingerprint"]["sae"]
    other_sae.save(sae_dir)  # retrained in place
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sae: was sha256" in err and "--overwrite" in err and "latents" not in err
    assert main([*argv, "--overwrite"]) == 0
    now = json.loads((out / "run.json").read_text())["fingerprint"]["sae"]
    assert now != first and json.loads((out / "records" / "meta.json").read_text())["sae"] == now
    assert len(_jsonl(out / "scores.jsonl")) == 4


def test_cli_flags_reach_the_config(monkeypatch):
    import argparse

    from autointerp import cli

    seen = {}

    def fake_run(cfg):
        seen["cfg"] = cfg
        return {"n_latents": 0, "n_explained": 0, "scores": {}, "scorers": {}}

    monkeypatch.setattr(cli, "run_interp", fake_run)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    cli.run(parser.parse_args(["--sae", "s", "--out", "o"]))
    assert seen["cfg"].retry_failed and not seen["cfg"].overwrite
    cli.run(parser.parse_args(["--sae", "s", "--out", "o", "--no-retry-failed", "--overwrite"]))
    assert not seen["cfg"].retry_failed and seen["cfg"].overwrite


def test_results_of_an_older_format_are_refused_not_mixed(tmp_path, records_dir, sae):
    from autointerp.pipeline import RESULTS_FORMAT

    out = _fresh(tmp_path, records_dir)
    run_interp(_cfg(out), sae=sae, embedder=FakeEmbedder())
    run = json.loads((out / "run.json").read_text())
    run["fingerprint"]["format"] = 1  # scored before shown contexts were held out
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match=f"format: was 1, now {RESULTS_FORMAT}.*--overwrite"):
        run_interp(_cfg(out), sae=sae, embedder=FakeEmbedder())
