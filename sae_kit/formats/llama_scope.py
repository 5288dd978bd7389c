"""Llama Scope (OpenMOSS, `fnlp/Llama3_1-8B-Base-L*`): `hyperparams.json` + `checkpoints/final.safetensors`.

Read as SAELens reads it: a JumpReLU SAE on inputs scaled by s = √d_model / dataset_average_activation_norm.in
(expected_average_only_in with that factor, kept explicit), encoder uncentred, one threshold for every latent:

    pre = (s·x) encoder.weightᵀ + encoder.bias,   z = ReLU(pre)·1[pre > jump_relu_threshold·s]
    ŷ = (z decoder.weightᵀ + decoder.bias) / s
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_kit.formats.common import FormatError, dtype_name, load_safetensors, make_config, read_json, take
from sae_kit.sae.base import SAEConfig

NAME = "llama-scope"
HPARAMS, WEIGHTS = "hyperparams.json", "checkpoints/final.safetensors"
LOOKS_FOR = f"{HPARAMS} + {WEIGHTS}"
MODEL = "meta-llama/Llama-3.1-8B"


def detect(path: Path) -> bool:
    """A folder with hyperparams.json and checkpoints/final.safetensors."""
    return path.is_dir() and (path / HPARAMS).is_file() and (path / WEIGHTS).is_file()


def read(path: Path, dtype: str | None = None, trust_remote_pickle: bool = False,
         options: dict[str, Any] | None = None) -> tuple[SAEConfig, dict[str, Tensor], Path]:
    """Our config and state dict for a Llama Scope folder."""
    hp_path, weights = path / HPARAMS, path / WEIGHTS
    hp = read_json(hp_path)
    try:
        d_in, d_sae = int(hp["d_model"]), int(hp["d_sae"])
        scale = math.sqrt(d_in) / float(hp["dataset_average_activation_norm"]["in"])
        theta = float(hp["jump_relu_threshold"]) * scale
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise FormatError(f"{hp_path} needs d_model, d_sae, jump_relu_threshold and dataset_average_activation_norm"
                          f".in (a positive number)") from None
    given = (options or {}).get("norm_scaling_factor")
    if given is not None and not math.isclose(float(given), scale, rel_tol=1e-6):
        raise FormatError(f"{hp_path} fixes norm_scaling_factor = √d_model / dataset_average_activation_norm.in = "
                          f"{scale:.6g} (its threshold is scaled by it too); got {given}: leave it out")
    file = load_safetensors(weights)
    fmt = "Llama Scope"
    w_enc = take(file, "encoder.weight", (d_sae, d_in), weights, fmt).T
    state = {"W_enc": w_enc, "b_enc": take(file, "encoder.bias", (d_sae,), weights, fmt),
             "W_dec": take(file, "decoder.weight", (d_in, d_sae), weights, fmt).T,
             "b_dec": take(file, "decoder.bias", (d_in,), weights, fmt),
             # float32 until the coder is cast: a bfloat16 file read as float32 keeps SAELens's exact threshold
             "threshold": torch.full((d_sae,), max(theta, 0.0), dtype=torch.float32)}
    fields: dict[str, Any] = {
        "architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": False,
        "normalize_activations": "expected_average_only_in", "norm_scaling_factor": scale,
        "hook_point": hp.get("hook_point_in", ""), "model_name": MODEL,
        "dtype": dtype or dtype_name(w_enc.dtype), "metadata": {"source_format": NAME, "source_config": hp},
        **(options or {}),
    }
    return make_config(hp_path, **fields), state, weights
