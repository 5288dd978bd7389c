"""dictionary_learning (saprmarks/dictionary_learning, SAEBench's trainers): `ae.pt` (a state dict) + `config.json`
(`trainer.dict_class`, `activation_dim`, `dict_size`, `k`, `layer`, `lm_name`, `submodule_name`).

Their forwards, which the reader reproduces exactly (E = encoder.weight (d_sae, d_in), D = decoder.weight
(d_in, d_sae), n_i = ‖D[:, i]‖):

    AutoEncoder          z = ReLU((x − bias)Eᵀ + encoder.bias),            ŷ = z Dᵀ + bias
    AutoEncoderNew       z = ReLU(x Eᵀ + encoder.bias),                    ŷ = z Dᵀ + decoder.bias
    AutoEncoderTopK      z = TopK_k(ReLU((x − b_dec)Eᵀ + encoder.bias)),  ŷ = z Dᵀ + b_dec
    BatchTopKSAE         z = r·1[r > threshold], r = ReLU((x − b_dec)Eᵀ + encoder.bias)   (inference rule)
    JumpReluAutoEncoder  z = ReLU(p·1[p > threshold])·‖W_dec[i]‖, p = x W_enc + b_enc;  ŷ = (z/‖W_dec[i]‖) W_dec + b_dec
    GatedAutoEncoder     z = 1[e + gate_bias > 0]·ReLU(e^r_mag·e + mag_bias)·n_i, e = (x − decoder_bias)Eᵀ;
                         ŷ = (z/n_i) Dᵀ + decoder_bias

The decoder-norm factors of JumpReLU and Gated are folded into the weights (latent i scaled by n_i: exact up to
rounding). A BatchTopK file whose threshold was never set (≤ 0) is a plain ReLU SAE, as its forward then is.
`ae.pt` is read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_kit.formats.common import (
    FormatError,
    decoder_row_norms,
    dtype_name,
    fold_latent_scale,
    load_pickle,
    make_config,
    read_json,
    take,
)
from sae_kit.sae.base import SAEConfig

NAME = "dictionary_learning"
WEIGHTS, CONFIG = "ae.pt", "config.json"
LOOKS_FOR = f"{WEIGHTS} + {CONFIG} (trainer.dict_class)"
DICT_CLASSES = ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder",
                "GatedAutoEncoder")
SUBMODULES = {"resid_post": "hook_resid_post", "resid_pre": "hook_resid_pre", "mlp_out": "hook_mlp_out",
              "attn_out": "hook_attn_out"}


def detect(path: Path) -> bool:
    """A folder with ae.pt and config.json."""
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def hook_point(trainer: dict[str, Any]) -> str:
    """TransformerLens hook point from SAEBench's `submodule_name` (`resid_post_layer_12`) or the layer."""
    name, layer = trainer.get("submodule_name") or "", trainer.get("layer")
    if m := re.fullmatch(r"(resid_post|resid_pre|mlp_out|attn_out)_layer_(\d+)", name):
        return f"blocks.{m.group(2)}.{SUBMODULES[m.group(1)]}"
    return f"blocks.{layer}.hook_resid_post" if isinstance(layer, int) and not name else name


def read(path: Path, dtype: str | None = None, trust_remote_pickle: bool = False,
         options: dict[str, Any] | None = None) -> tuple[SAEConfig, dict[str, Tensor], Path]:
    """Our config and state dict for a dictionary_learning folder."""
    cfg_path, file = path / CONFIG, path / WEIGHTS
    trainer = read_json(cfg_path).get("trainer") or {}
    cls = trainer.get("dict_class")
    if cls not in DICT_CLASSES:
        raise FormatError(f"{cfg_path}: trainer.dict_class {cls!r} is not supported; supported: {list(DICT_CLASSES)}")
    raw = load_pickle(file, trust_remote_pickle)
    if not isinstance(raw, dict):
        raise FormatError(f"{file} holds a {type(raw).__name__}, expected a state dict")
    try:
        d_in, d_sae = int(trainer["activation_dim"]), int(trainer["dict_size"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{cfg_path} needs integer trainer.activation_dim and trainer.dict_size") from None

    def need(key: str, shape: tuple[int, ...]) -> Tensor:
        return take(raw, key, shape, file, cls)

    fields: dict[str, Any] = {"architecture": "relu"}
    if cls == "JumpReluAutoEncoder":
        state = {"W_enc": need("W_enc", (d_in, d_sae)), "b_enc": need("b_enc", (d_sae,)),
                 "W_dec": need("W_dec", (d_sae, d_in)), "b_dec": need("b_dec", (d_in,)),
                 "threshold": need("threshold", (d_sae,)).clamp_min(0)}  # ReLU(p·1[p > θ]) = ReLU(p) for θ ≤ 0
        fold_latent_scale(state, decoder_row_norms(state["W_dec"], file), thresholds=("threshold",))
        fields = {"architecture": "jumprelu", "apply_b_dec_to_input": False}
    elif cls == "GatedAutoEncoder":
        state = {"W_enc": need("encoder.weight", (d_sae, d_in)).T, "W_dec": need("decoder.weight", (d_in, d_sae)).T,
                 "b_dec": need("decoder_bias", (d_in,)), "b_gate": need("gate_bias", (d_sae,)),
                 "r_mag": need("r_mag", (d_sae,)), "b_mag": need("mag_bias", (d_sae,))}
        fold_latent_scale(state, decoder_row_norms(state["W_dec"], file), biases=("b_gate", "b_mag"))
        fields = {"architecture": "gated"}
    else:
        bias = {"AutoEncoder": "bias", "AutoEncoderNew": "decoder.bias"}.get(cls, "b_dec")
        state = {"W_enc": need("encoder.weight", (d_sae, d_in)).T, "b_enc": need("encoder.bias", (d_sae,)),
                 "W_dec": need("decoder.weight", (d_in, d_sae)).T, "b_dec": need(bias, (d_in,))}
        if cls == "AutoEncoderNew":
            fields["apply_b_dec_to_input"] = False
        if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
            k = int(need("k", ())) if "k" in raw else trainer.get("k")
            theta = float(need("threshold", ())) if "threshold" in raw else -1.0
            if cls == "AutoEncoderTopK":  # its encode ranks per row; the stored threshold is unused by default
                fields = {"architecture": "topk", "k": k}
            elif theta > 0:
                fields = {"architecture": "batchtopk", "k": k}
                state["threshold"] = torch.tensor(theta, dtype=state["W_enc"].dtype)
    known = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "k", "encoder.weight", "encoder.bias", "decoder.weight",
             "decoder.bias", "bias", "decoder_bias", "gate_bias", "r_mag", "mag_bias", "_hub_mixin_config"}
    unexpected = sorted(set(raw) - known)
    if unexpected:
        raise FormatError(f"{file} holds entries {unexpected} that a {cls} does not have")
    lm = trainer.get("lm_name") or ""
    fields.update({
        "d_in": d_in, "d_sae": d_sae, "hook_point": hook_point(trainer), "model_name": lm,
        "dtype": dtype or dtype_name(state["W_enc"].dtype),
        "metadata": {"source_format": NAME, "source_config": read_json(cfg_path), "dict_class": cls},
        **(options or {}),
    })
    return make_config(cfg_path, **fields), state, file
