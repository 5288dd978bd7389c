"""OpenAI sparse_autoencoder (Gao et al. 2024 release): one torch file per SAE (`autoencoders/5.pt`), the state
dict of `sparse_autoencoder.Autoencoder` with its activation's name and settings beside the tensors.

    TopK release: x' = LN(x) = (x − mean)/(std + 1e-5);  z = ReLU(TopK_k((x' − pre_bias) encoder.weightᵀ + latent_bias))
                  ŷ = (z decoder.weightᵀ + pre_bias)·std + mean
    ReLU release: the same without LN (their `from_state_dict` layer-normalises exactly when the activation is TopK)

The layer norm becomes our explicit `normalize_activations="layer_norm"`. The file is read with
`torch.load(weights_only=True)` (it holds only tensors, strings and ints). No model or hook point is recorded: they
come from the caller, or from the release's folder names (`gpt2-small/resid_post_mlp_v5_32k/autoencoders/5.pt` →
gpt2, `blocks.5.hook_resid_post`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor

from sae_kit.formats.common import FormatError, dtype_name, load_pickle, make_config, take
from sae_kit.sae.base import SAEConfig

NAME = "openai"
LOOKS_FOR = "one .pt file (a folder holding exactly one) with pre_bias, encoder.weight, latent_bias, decoder.weight"
KEYS = {"pre_bias", "encoder.weight", "latent_bias", "decoder.weight"}
BUFFERS = {"stats_last_nonzero", "latents_activation_frequency", "latents_mean_square"}
LOCATIONS = {"resid_post_mlp": "blocks.{layer}.hook_resid_post", "resid_post_attn": "blocks.{layer}.hook_resid_mid",
             "resid_delta_mlp": "blocks.{layer}.hook_mlp_out", "resid_delta_attn": "blocks.{layer}.hook_attn_out"}


def _file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".pt" else None
    files = sorted(path.glob("*.pt")) if path.is_dir() else []
    return files[0] if len(files) == 1 and not (path / "config.json").exists() else None


def detect(path: Path) -> bool:
    """A .pt file, or a folder holding exactly one and no config.json (its keys are checked when read)."""
    return _file(path) is not None


def guess_origin(path: Path) -> dict[str, str]:
    """model_name and hook_point from the release's folder names, where present."""
    text = path.resolve().as_posix()
    out: dict[str, str] = {}
    if "gpt2" in text:
        out["model_name"] = "gpt2"
    loc = re.search(r"(resid_(?:post|delta)_(?:mlp|attn))", text)
    if loc and path.stem.isdigit():
        out["hook_point"] = LOCATIONS[loc.group(1)].format(layer=int(path.stem))
    return out


def read(path: Path, dtype: str | None = None, trust_remote_pickle: bool = False,
         options: dict[str, Any] | None = None) -> tuple[SAEConfig, dict[str, Tensor], Path]:
    """Our config and state dict for an OpenAI Autoencoder file."""
    file = _file(path)
    if file is None:
        raise FormatError(f"{path}: expected one OpenAI .pt file (or a folder with exactly one)")
    state = load_pickle(file, trust_remote_pickle)
    if not isinstance(state, dict):
        raise FormatError(f"{file} holds a {type(state).__name__}, expected the Autoencoder's state dict")
    if file.name == "ae.pt" and not {"pre_bias", "latent_bias"} & set(state):  # dictionary_learning's, config lost
        raise FormatError(f"{file} is a dictionary_learning ae.pt, not an OpenAI file: it needs its config.json "
                          f"(trainer.dict_class, activation_dim, dict_size) in the same folder; copy it from where "
                          f"ae.pt came from")
    activation = state.get("activation", "ReLU")
    settings = state.get("activation_state_dict") or {}
    if activation == "TopK" and settings.get("postact_fn", "ReLU") != "ReLU":
        raise FormatError(f"{file}: TopK with postact_fn {settings.get('postact_fn')!r} is not supported; only ReLU is")
    if activation not in ("TopK", "ReLU"):
        raise FormatError(f"{file}: activation {activation!r} is not supported; supported: TopK, ReLU")
    fmt = "OpenAI"
    enc = state.get("encoder.weight")
    d_sae, d_in = enc.shape if isinstance(enc, Tensor) and enc.ndim == 2 else (0, 0)
    ours = {"W_enc": take(state, "encoder.weight", (d_sae, d_in), file, fmt).T,
            "b_enc": take(state, "latent_bias", (d_sae,), file, fmt),
            "W_dec": take(state, "decoder.weight", (d_in, d_sae), file, fmt).T,
            "b_dec": take(state, "pre_bias", (d_in,), file, fmt)}
    unexpected = sorted(set(state) - KEYS - BUFFERS - {"activation", "activation_state_dict"})
    if unexpected:
        raise FormatError(f"{file} holds entries {unexpected} that an OpenAI Autoencoder does not have")
    topk = activation == "TopK"
    if topk and not isinstance(settings.get("k"), int):
        raise FormatError(f"{file}: a TopK Autoencoder needs activation_state_dict['k'] (an int)")
    fields: dict[str, Any] = {
        "architecture": "topk" if topk else "relu", "d_in": d_in, "d_sae": d_sae,
        "k": settings["k"] if topk else None, "normalize_activations": "layer_norm" if topk else "none",
        "dtype": dtype or dtype_name(ours["W_enc"].dtype), "metadata": {"source_format": NAME},
        **guess_origin(file), **(options or {}),
    }
    return make_config(file, **fields), ours, file
