"""TrainConfig's architectures come from the registry: a new architecture file is all it takes."""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from sae_kit.sae import SparseCoder
from sae_kit.sae.topk import TopKSAE
from sae_kit.train.config import ARCHITECTURES, TOPK_FAMILY, TrainConfig


def test_architectures_and_the_topk_family_are_the_registry():
    shipped = {name: cls for name, cls in SparseCoder.REGISTRY.items() if cls.__module__.startswith("sae_kit.sae.")}
    assert set(ARCHITECTURES) == set(shipped) >= {"topk", "batchtopk", "jumprelu", "abstopk", "relu"}
    assert set(TOPK_FAMILY) == {name for name, cls in shipped.items() if cls.has_k}
    assert {"topk", "batchtopk", "abstopk"} <= set(TOPK_FAMILY) and not {"jumprelu", "relu"} & set(TOPK_FAMILY)


def test_a_newly_registered_architecture_trains_without_touching_the_config(monkeypatch):
    monkeypatch.setattr(SparseCoder, "REGISTRY", dict(SparseCoder.REGISTRY))  # forgotten after the test

    class HalfTopK(TopKSAE):
        architecture = "half_topk_for_this_test"

    class Dense(SparseCoder):
        architecture = "dense_for_this_test"

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return self.pre_acts(x).relu()

    assert TrainConfig(architecture=HalfTopK.architecture, k=4, d_sae=16).architecture == HalfTopK.architecture
    with pytest.raises(ValueError, match="k must be smaller than d_sae"):  # the k checks of the TopK family apply
        TrainConfig(architecture=HalfTopK.architecture, k=16, d_sae=16)
    TrainConfig(architecture=Dense.architecture, k=16, d_sae=16)  # no k: not checked
    with pytest.raises(ValueError, match=r"unknown architecture 'gated_for_this_test'; valid: \[.*'topk'"):
        TrainConfig(architecture="gated_for_this_test")


def test_toml_config_files_read_through_tomli_before_python_3_11(tmp_path, monkeypatch):
    from sae_kit.train.cli import read_config_file

    parser = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
    calls = []
    tomli = types.ModuleType("tomli")
    tomli.loads = lambda text: calls.append(text) or parser.loads(text)
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on 3.10: `import tomllib` fails
    monkeypatch.setitem(sys.modules, "tomli", tomli)
    (tmp_path / "c.toml").write_text('architecture = "abstopk"\nk = 5\n')
    assert read_config_file(str(tmp_path / "c.toml")) == {"architecture": "abstopk", "k": 5} and len(calls) == 1


@pytest.mark.parametrize("kw, match", [
    (dict(architecture="jumprelu", sweep={"k": [8, 16]}), r"jumprelu has no k, so a sweep over k \[8, 16\] would "
                                                         r"train identical SAEs; sweep k with topk"),
    (dict(architecture="topk", sweep={"sparsity_coefficient": [0.1, 0.5]}), r"topk has no sparsity penalty, so a "
                                                                              r"sweep .* applies to gated, jumprelu, relu"),
    (dict(architecture="jumprelu", target_l0=8.0), r"target_l0 8.0 is reached through the penalty .* which λ = 0.0 "
                                                   r"switches off; pass .* --sparsity-coefficient 1"),
    (dict(architecture="jumprelu", target_l0=8.0, sweep={"sparsity_coefficient": [1.0, 0.0]}), r"λ = 0.0 switches off"),
    (dict(architecture="topk", target_l0=8.0), "target_l0 is JumpReLU's L0 target; topk does not read it"),
])
def test_settings_the_architecture_would_ignore_are_refused(kw, match):
    """A sweep axis the architecture never reads (identical SAEs under different names), and a target L0 that
    nothing pulls toward, are errors naming the value and what would apply."""
    with pytest.raises(ValueError, match=match):
        TrainConfig(hook_points="h", **kw)
    TrainConfig(hook_points="h", architecture="jumprelu", target_l0=8.0, sparsity_coefficient=1.0)
    TrainConfig(hook_points="h", architecture="relu", sweep={"sparsity_coefficient": [1e-3, 1e-2]})


def test_a_dense_penalty_free_architecture_is_warned_about(tmp_path, caplog):
    """jumprelu / relu with λ = 0 train dense: allowed, with a warning that says what to pass."""
    import logging

    from sae_kit.train import TensorSource, train

    c = TrainConfig(hook_points="h", architecture="relu", d_sae=32, n_tokens=512, batch_size=256, out=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        train(c, TensorSource({"h": torch.randn(512, 8)}), progress=False)
    assert "relu with sparsity coefficient λ = 0: nothing pushes its L0 down" in caplog.text
