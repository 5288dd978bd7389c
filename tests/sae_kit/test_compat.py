"""An SAE's recorded model and hook point against the requested ones, and its hook points against a loaded model."""
from __future__ import annotations

import logging
import shutil

import pytest

from activation_store.model import reference_model_path
from sae_kit.compat import check_compatible, check_requested, model_to_use, recorded_model
from sae_kit.sae import SAEConfig

HOOK = "blocks.0.hook_resid_post"


def sae_cfg(model_name: str = "", hook: str = HOOK, d_in: int = 32, **kw) -> SAEConfig:
    return SAEConfig(architecture="topk", d_in=d_in, d_sae=64, k=4, hook_point=hook, model_name=model_name, **kw)


def test_recorded_model_reads_the_name_or_the_metadata():
    assert recorded_model(sae_cfg("gpt2")) == "gpt2"
    assert recorded_model(sae_cfg(metadata={"model": "EleutherAI/pythia-70m"})) == "EleutherAI/pythia-70m"
    assert recorded_model(sae_cfg(metadata={"model_name": {"name": "m"}})) == "m"
    assert recorded_model(sae_cfg()) is None
    assert model_to_use(sae_cfg(), None) == "reference" and model_to_use(sae_cfg("gpt2"), None) == "gpt2"
    assert model_to_use(sae_cfg("gpt2"), "x") == "x"


def test_another_model_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"SAE 'runs/sae' was trained on model 'gpt2' .* model 'gpt2-medium' was "
                                         r"requested; leave --model out"):
        check_requested(sae_cfg("gpt2"), "runs/sae", model="gpt2-medium")
    check_requested(sae_cfg("gpt2"), "runs/sae", model="gpt2")
    check_requested(sae_cfg("gpt2"), "runs/sae", model=None)  # nothing requested
    check_requested(sae_cfg(), "runs/sae", model="gpt2")  # nothing recorded


def test_local_folders_are_the_same_model_when_they_are_copies(tiny_gpt2_path, tiny_llama_path, tmp_path):
    copy = shutil.copytree(tiny_gpt2_path, tmp_path / "copy")
    check_requested(sae_cfg(str(tiny_gpt2_path)), "s", model=str(tiny_gpt2_path) + "/")
    check_requested(sae_cfg(str(tiny_gpt2_path)), "s", model=str(copy))
    check_requested(sae_cfg("reference"), "s", model=str(reference_model_path()))
    with pytest.raises(ValueError, match="was trained on model"):
        check_requested(sae_cfg(str(tiny_gpt2_path)), "s", model=str(tiny_llama_path))
    with pytest.raises(ValueError, match="was trained on model 'reference'"):
        check_requested(sae_cfg("reference"), "s", model=str(tiny_gpt2_path))


def test_a_hub_name_against_a_local_folder_warns(tiny_gpt2_path, caplog):
    with caplog.at_level(logging.WARNING):
        check_requested(sae_cfg("gpt2"), "s", model=str(tiny_gpt2_path))
    assert "trained on model 'gpt2'" in caplog.text and "local copy" in caplog.text


def test_another_hook_point_is_refused():
    with pytest.raises(ValueError, match=r"reads hook point 'blocks.0.hook_resid_post'.*'blocks.1.hook_resid_post' "
                                         r"was requested"):
        check_requested(sae_cfg(), "s", hook_point="blocks.1.hook_resid_post")
    check_requested(sae_cfg(), "s", hook_point=HOOK)


def test_check_compatible_takes_a_config_without_weights(tiny_model):
    check_compatible(tiny_model, sae_cfg())
    with pytest.raises(ValueError, match=r"SAE 's' expects width 48 at hook_point .* \(d_in=48\).*has width 32"):
        check_compatible(tiny_model, sae_cfg(d_in=48), "s")
    with pytest.raises(ValueError, match=r"unknown hook point 'blocks.0.hook_resid_pots'.*closest"):
        check_compatible(tiny_model, sae_cfg(hook="blocks.0.hook_resid_pots"))
    with pytest.raises(ValueError, match="records no hook_point"):
        check_compatible(tiny_model, sae_cfg(hook=""))
    with pytest.raises(ValueError, match=r"records no hook_point \(its gemma-scope files have none\).*sae-kit convert "
                                         r"SRC DST --to sae-kit --hook-point HOOK"):
        check_compatible(tiny_model, sae_cfg(hook="", metadata={"source_format": "gemma-scope"}))
    tc = sae_cfg(transcoder=True, d_out=16, target_hook_point="blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match=r"expects width 16 at target_hook_point 'blocks.0.hook_mlp_out' \(d_out=16\)"):
        check_compatible(tiny_model, tc)


def test_a_transcoder_whose_target_fires_before_its_input_is_refused(tiny_model):
    """The splice needs the input before the target in one forward pass; a backwards pair used to fail with a
    RuntimeError traceback mid-eval, after the mean-ablation pass."""
    backwards = sae_cfg(hook="blocks.1.hook_resid_post", transcoder=True, target_hook_point="blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match=r"transcoder 'tc' reads 'blocks.1.hook_resid_post', which .* only after its "
                                         r"target 'blocks.0.hook_mlp_out'"):
        check_compatible(tiny_model, backwards, "tc")
    check_compatible(tiny_model, sae_cfg(hook="blocks.0.hook_resid_mid", transcoder=True,
                                         target_hook_point="blocks.0.hook_mlp_out"))
    check_compatible(tiny_model, sae_cfg(transcoder=True, target_hook_point=HOOK))  # one hook point: allowed
