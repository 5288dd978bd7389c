"""Training, eval and interp agree on the default device: CUDA when present, else the CPU."""
from __future__ import annotations

import pytest
import torch

from autointerp.pipeline import InterpConfig, run_interp
from evals.evaluate import EvalConfig, run_eval
from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.train import TrainConfig


class Stop(Exception):
    """Raised by the stand-in loader once it has seen the device."""


@pytest.mark.parametrize("cuda", [True, False])
def test_eval_and_interp_pick_the_device_training_picks(cuda, tmp_path, monkeypatch):
    assert TrainConfig().device is None and EvalConfig(sae_paths=("s",), out="o").device is None
    assert InterpConfig(sae_path="s", out="o").device is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    want = "cuda" if cuda else "cpu"
    seen = []

    def load_model(name, backend="auto", device=None, **kw):
        seen.append(str(device))
        raise Stop

    monkeypatch.setattr("evals.evaluate.load_model", load_model)
    monkeypatch.setattr("activation_store.model.load_model", load_model)
    sae = tmp_path / "sae"
    SparseCoder.from_config(SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2, hook_point="h",
                                      model_name="m")).save(sae)
    with pytest.raises(Stop):
        run_eval(EvalConfig(sae_paths=(str(sae),), out=str(tmp_path / "eval")), progress=False)
    loaded = SparseCoder.load(sae)
    monkeypatch.setattr(SparseCoder, "load", staticmethod(lambda path, device="cpu": seen.append(str(device))
                                                          or loaded))
    with pytest.raises(Stop):
        run_interp(InterpConfig(sae_path=str(sae), out=str(tmp_path / "interp"), latents="0:4", progress=False))
    assert seen == [want, want, want]  # eval's model, interp's SAE, interp's model
