"""`sae-kit run` config validation: every problem reported up front, at once, with file, line, key and fix."""
from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from tiny_pipeline import CONFIG as GOOD

from sae_kit.cli import main
from sae_kit.pipeline import EXAMPLES, ConfigError, load_config
from sae_kit.pipeline.validate import endpoint_problem, resolve_config_path
from sae_kit.sae.base import SparseCoder
from sae_kit.sae.topk import TopKSAE

BAD = """\
out: {out}
model: {model}
modle: gpt2
cache: {{n_tokens: 4096, dataset: {{path: stdlib, context_size: 32}}}}
train:
  - name: tk
    archtecture: topk
    hook_points: blocks.1.hook_resid_post
    k: 64
    expansion: 2
    batch_size: 8192
    n_tokens: 16384
  - name: typo
    hook_points: blocks.1.hook_resid_pots
    activations: somewhere
  - name: deep
    hook_points: blocks.7.hook_resid_post
eval:
  n_tokens: many
interp:
  explainer: llm
  llm: http://127.0.0.1:{port}/v1:some-model
  records: {{n_tokens: 2048, context_size: 32}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write(tmp_path: Path, text: str, **kw) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text.format(**kw))
    return path


def test_every_problem_is_reported_at_once_with_line_key_and_fix(tmp_path, tiny_gpt2_path):
    path = write(tmp_path, BAD, out=tmp_path / "out", model=tiny_gpt2_path, port=free_port())
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    err = info.value
    by_key = {i.key: i for i in err.issues}
    # unknown keys, with a "did you mean"
    assert "did you mean 'model'" in by_key["modle"].message and by_key["modle"].line == 3
    assert "did you mean 'architecture'" in by_key["train[0].archtecture"].message
    assert by_key["train[0].archtecture"].fix == "rename it to 'architecture'"
    assert by_key["train[0].archtecture"].line == 7
    # a wrong type, with an example of the right one
    assert "expected an integer, got str 'many'" in by_key["eval.n_tokens"].message
    assert "n_tokens: 65536" in by_key["eval.n_tokens"].fix and by_key["eval.n_tokens"].line == 19
    # a field the pipeline sets itself
    assert "set by the pipeline" in by_key["train[1].activations"].message
    # hook points the 2-block model lacks: a misspelling gets the closest names, a block too deep says so
    typo = by_key["train[1].hook_points"]
    assert "blocks.1.hook_resid_pots" in typo.message and "blocks.1.hook_resid_post" in typo.fix
    assert "has 2 blocks" in by_key["train[2].hook_points"].message
    # impossible sizes: k against expansion × the hook point's width (32), a batch beyond the cached tokens
    assert "k = 64" in by_key["train[0].k"].message and "d_sae = 64" in by_key["train[0].k"].message
    assert "8192 rows per step" in by_key["train[0].batch_size"].message
    # an LLM explainer with nothing listening at its endpoint
    assert "not reachable" in by_key["interp.llm"].message and "baseline" in by_key["interp.llm"].fix
    # one message with all of them, naming the file
    text = str(err)
    assert text.startswith(f"{len(err.issues)} problems in {path}:")
    assert f"{path}:7: train[0].archtecture" in text
    assert not (tmp_path / "out").exists()


def test_k_is_checked_for_an_architecture_registered_after_import(tmp_path, tiny_gpt2_path, monkeypatch):
    monkeypatch.setattr(SparseCoder, "REGISTRY", dict(SparseCoder.REGISTRY))  # forgotten after the test

    class LateTopK(TopKSAE):
        architecture = "late_topk_for_this_test"

    text = GOOD.replace("architecture: topk", f"architecture: {LateTopK.architecture}").replace(
        "k: [2, 4]\n    d_sae: 64", "k: 64\n    expansion: 2")  # the hook point is 32 wide: d_sae 64
    with pytest.raises(ConfigError) as info:
        load_config(str(write(tmp_path, text, out=tmp_path / "out", model=tiny_gpt2_path)))
    problem = {i.key: i for i in info.value.issues}["train[0].k"]
    assert "k = 64" in problem.message and "d_sae = 64" in problem.message


def test_the_cli_reports_them_and_computes_nothing(tmp_path, tiny_gpt2_path, capsys):
    path = write(tmp_path, BAD, out=tmp_path / "out", model=tiny_gpt2_path, port=free_port())
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sae-kit run: error:" in err and "did you mean 'architecture'" in err and "fix:" in err
    assert not (tmp_path / "out").exists()


def test_a_good_config_passes_and_fills_in_what_the_stages_share(tmp_path, tiny_gpt2_path):
    cfg = load_config(str(write(tmp_path, GOOD, out=tmp_path / "out", model=tiny_gpt2_path)))
    assert cfg.cache.hook_points == ("blocks.1.hook_resid_post",)  # what the training pass reads
    assert cfg.cache.out == str(tmp_path / "out" / "cache" / "activations")
    (t,) = cfg.train
    assert t.activations == cfg.cache.out and t.out == str(tmp_path / "out" / "train" / "tk")
    assert cfg.sae_names() == ["tk_k2", "tk_k4"]
    assert cfg.interp["latents"] == "random:4"  # an integer means that many random live latents
    icfg = cfg.interp_config("sae", "o", control=True)
    assert icfg.control == "random-directions" and icfg.records.n_tokens == 1024


def test_hook_missing_from_an_explicit_cache_list(tmp_path, tiny_gpt2_path):
    text = GOOD.replace("cache: {{", "cache: {{hook_points: [blocks.0.hook_resid_post], ")
    with pytest.raises(ConfigError) as info:
        load_config(str(write(tmp_path, text, out=tmp_path / "o", model=tiny_gpt2_path)))
    (issue,) = info.value.issues
    assert issue.key == "train[0].hook_points" and "cache.hook_points" in issue.fix


def test_an_llm_endpoint_that_listens_passes(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        accept = threading.Thread(target=lambda: server.accept()[0].close(), daemon=True)
        accept.start()
        assert endpoint_problem(f"http://127.0.0.1:{port}/v1:m") is None
    assert "cannot connect" in endpoint_problem(f"http://127.0.0.1:{free_port()}/v1:m")
    assert "no local model" in endpoint_problem(f"local:{tmp_path / 'nothing'}")
    assert "unknown LLM spec" in endpoint_problem("ftp://x")


def test_the_default_config_validates_against_the_reference_model():
    cfg = load_config(None)
    assert cfg.model == "reference" and cfg.source == "<default config>"
    assert len(cfg.sae_names()) >= 2  # a sweep, so the site shows the sweep plots


def test_shipped_configs_by_name_and_a_near_miss():
    assert resolve_config_path("default") == EXAMPLES["default"]
    assert resolve_config_path(None) == EXAMPLES["default"]
    with pytest.raises(FileNotFoundError, match="did you mean the shipped config 'pythia-70m-mlp-transcoder'"):
        resolve_config_path("pythia-70m-mlp-transcode")


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("out: x\ntrain: [\n  name: a\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: \(file\): not valid YAML"):
        load_config(str(path), check_model=False)


def test_passes_sharing_a_folder_latents_past_d_sae_and_contexts_past_the_model(tmp_path, tiny_gpt2_path):
    """Caught before anything runs: two passes writing one train/<name>/ folder (the second would delete the
    first's SAEs), a latent range beyond the SAEs, and contexts longer than the model's 128 positions."""
    text = GOOD.replace("context_size: 32}}, batch_size", "context_size: 256}}, batch_size").replace(
        "interp: {{latents: 4,", "interp: {{latents: '60:70',").replace(
        "eval: {{n_tokens: 512, batch_size: 8}}", "eval: {{n_tokens: 512, batch_size: 8, context_size: 200}}").replace(
        "    log_every: 2\n", "    log_every: 2\n  - {{name: tk, architecture: topk, hook_points: blocks.1.hook_resid_post, "
                            "k: 3, d_sae: 64}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(write(tmp_path, text, out=tmp_path / "out", model=tiny_gpt2_path)))
    by_key = {i.key: i for i in info.value.issues}
    assert "two training passes share the name 'tk' (and the folder train/tk/)" in by_key["train[0].name"].message
    assert "latent range '60:70' out of bounds" in by_key["interp.latents"].message
    assert "256 tokens per context, but model" in by_key["cache.dataset.context_size"].message
    assert "reads at most 128" in by_key["eval.context_size"].message
    assert not (tmp_path / "out").exists()


def test_eval_suite_settings_are_checked_key_by_key_and_built(tmp_path, tiny_gpt2_path):
    """eval.suite is a nested config: typos are reported at their full path, and good values reach the stage as a
    SuiteConfig (a plain mapping used to pass the check and fail after cache and train)."""
    from evals.suites import SuiteConfig

    eval_line = "eval: {{n_tokens: 512, batch_size: 8}}"
    bad = GOOD.replace(eval_line, "eval: {{n_tokens: 512, suite: {{probng: 1, absorption: {{absorber_coss: 0.2}}}}}}")
    with pytest.raises(ConfigError) as info:
        load_config(str(write(tmp_path, bad, out=tmp_path / "out", model=tiny_gpt2_path)))
    by_key = {i.key: i for i in info.value.issues}
    assert "did you mean 'probing'" in by_key["eval.suite.probng"].message
    assert "did you mean 'absorber_cos'" in by_key["eval.suite.absorption.absorber_coss"].message
    good = GOOD.replace(eval_line, "eval: {{n_tokens: 512, suite: {{hub: null, absorption: {{absorber_cos: 0.2}}}}}}")
    cfg = load_config(str(write(tmp_path, good, out=tmp_path / "out", model=tiny_gpt2_path)))
    suite = cfg.eval_config(tmp_path / "sae", tmp_path / "ev").suite
    assert isinstance(suite, SuiteConfig) and suite.absorption.absorber_cos == 0.2 and suite.hub is None


def test_steer_settings_are_checked_before_anything_runs(tmp_path, tiny_gpt2_path):
    """Bad positions, strengths or temperature passed the check and failed at the steer stage, after cache, train,
    eval and interp had run."""
    steer_line = "steer: {{n_latents: 1, strengths: [0, 4], max_new_tokens: 4}}"
    assert steer_line in GOOD
    for bad, words in (("positions: first", "bad positions 'first'"), ("positions: '5:2'", "select nothing"),
                       ("strengths: [0, .nan]", "finite number"),
                       ("temperature: .nan", "temperature must be a finite number")):
        text = GOOD.replace(steer_line, f"steer: {{{{n_latents: 1, max_new_tokens: 4, {bad}}}}}")
        with pytest.raises(ConfigError) as info:
            load_config(str(write(tmp_path, text, out=tmp_path / "out", model=tiny_gpt2_path)), check_model=False)
        by_key = {i.key: i for i in info.value.issues}
        assert "steer" in by_key and words in by_key["steer"].message, (bad, by_key)


def test_decoder_suites_are_refused_for_transcoder_passes(tmp_path, tiny_gpt2_path):
    """absorption, scr and tpp set decoder directions against probes of the input; a transcoder's decoder writes its
    target, so a run that trains one and asks for them fails before the cache instead of after training."""
    tc = GOOD.replace("    hook_points: blocks.1.hook_resid_post\n", "    hook_points: blocks.1.hook_resid_mid\n"
                      "    target_hook_points: blocks.1.hook_mlp_out\n    transcoder: true\n")
    bad = tc.replace("eval: {{n_tokens: 512, batch_size: 8}}", "eval: {{n_tokens: 512, suites: [core, probing, tpp]}}")
    with pytest.raises(ConfigError) as info:
        load_config(str(write(tmp_path, bad, out=tmp_path / "out", model=tiny_gpt2_path)))
    (issue,) = [i for i in info.value.issues if i.key == "eval.suites"]
    assert "['tpp']" in issue.message and "train[0] trains transcoders" in issue.message
    ok = tc.replace("eval: {{n_tokens: 512, batch_size: 8}}", "eval: {{n_tokens: 512, suites: [core, probing]}}")
    assert load_config(str(write(tmp_path, ok, out=tmp_path / "out", model=tiny_gpt2_path))).train[0].transcoder


def test_a_transcoder_target_before_its_input_is_refused(tmp_path, tiny_gpt2_path):
    """Such a pair trained fine, then failed at eval (the splice needs the input first); now refused up front."""
    backwards = GOOD.replace("    hook_points: blocks.1.hook_resid_post\n", "    hook_points: blocks.1.hook_resid_post\n"
                             "    target_hook_points: blocks.0.hook_mlp_out\n    transcoder: true\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(write(tmp_path, backwards, out=tmp_path / "out", model=tiny_gpt2_path)))
    (issue,) = info.value.issues
    assert issue.key == "train[0].target_hook_points" and "fires before the transcoder's input" in issue.message
