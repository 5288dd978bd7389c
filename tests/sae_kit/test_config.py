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
