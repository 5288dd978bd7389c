"""Gemma Scope `params.npz` (Google DeepMind): a JumpReLU SAE whose encoder reads the input uncentred.

    pre = x W_enc + b_enc,   z = ReLU(pre)·1[pre > threshold],   ŷ = z W_dec + b_dec
    W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, threshold (d_sae,), b_dec (d_in,)

The file records no model or hook point: they come from the release registry, from the caller (`hook_point=`,
`model_name=`, `target_hook_point=`), or from a Gemma Scope repo name in the path (`gemma-scope-2b-pt-res/layer_5/...`
→ google/gemma-2-2b, `blocks.5.hook_resid_post`; `-mlp` → hook_mlp_out, `-att` → attn.hook_z).

The same file is a transcoder when it has a target hook point (given, or from a `-transcoders` repo in the path):
`gemma-scope-2b-pt-transcoders/layer_5/...` reads `blocks.5.ln2.hook_normalized` (the pre-MLP RMSNorm's output before
its gain, which Gemma Scope folds into the MLP's input weights) and predicts `blocks.5.hook_mlp_out` (the MLP's output
after the post-MLP RMSNorm: what the block adds to the residual), as the release's model card and SAELens have it.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae_kit.formats.common import FormatError, dtype_name, make_config, take
from sae_kit.sae.base import SAEConfig

NAME = "gemma-scope"
FILE = "params.npz"
LOOKS_FOR = f"{FILE} (W_enc, W_dec, b_enc, b_dec, threshold)"
HOOKS = {"res": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out",
         "att": "blocks.{layer}.attn.hook_z", "transcoders": "blocks.{layer}.ln2.hook_normalized"}
TARGETS = {"transcoders": "blocks.{layer}.hook_mlp_out"}
"""Target hook point per repo kind whose SAEs are transcoders."""


def detect(path: Path) -> bool:
    """A params.npz, or a folder holding one."""
    return path.name == FILE and path.is_file() or path.is_dir() and (path / FILE).is_file()


def guess_origin(path: Path) -> dict[str, str]:
    """model_name, hook_point (and target_hook_point) from a Gemma Scope repo and layer folder in the path."""
    # The path as given first: in a huggingface_hub cache the file is a symlink into blobs/, whose target names
    # the repo but not the layer folder.
    for text in (Path(os.path.abspath(path)).as_posix(), path.resolve().as_posix()):
        repo = re.search(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)", text)  # -it-: of gemma-2-*-it
        if repo:
            break
    else:
        return {}
    out = {"model_name": f"google/gemma-2-{repo.group(1)}{'-it' if repo.group(2) == 'it' else ''}"}
    layer = re.search(r"layer_(\d+)", text)
    if re.search(r"/embedding/", text):
        out["hook_point"] = "hook_embed"
    elif layer:
        out["hook_point"] = HOOKS[repo.group(3)].format(layer=layer.group(1))
        if repo.group(3) in TARGETS:
            out["target_hook_point"] = TARGETS[repo.group(3)].format(layer=layer.group(1))
    return out


def read(path: Path, dtype: str | None = None, trust_remote_pickle: bool = False,
         options: dict[str, Any] | None = None) -> tuple[SAEConfig, dict[str, Tensor], Path]:
    """Our config and state dict for a params.npz (pickled objects in it are refused)."""
    file_path = path if path.is_file() else path / FILE
    try:
        with np.load(file_path, allow_pickle=False) as data:
            # Some copies spell the weights w_enc / w_dec.
            arrays = {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(np.array(data[k])) for k in data}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # a truncated download is not a zip
        raise FormatError(f"{file_path} is not a readable numpy .npz of arrays ({err}); re-download it") from None
    if "W_enc" in arrays and arrays["W_enc"].ndim != 2:
        raise FormatError(f"{file_path}: 'W_enc' has shape {tuple(arrays['W_enc'].shape)}, expected (d_in, d_sae)")
    d_in, d_sae = arrays["W_enc"].shape if "W_enc" in arrays else (0, 0)
    w_enc = take(arrays, "W_enc", (d_in, d_sae), file_path, "Gemma Scope")
    state = {"W_enc": w_enc, "W_dec": take(arrays, "W_dec", (d_sae, d_in), file_path, "Gemma Scope"),
             "b_enc": take(arrays, "b_enc", (d_sae,), file_path, "Gemma Scope"),
             "b_dec": take(arrays, "b_dec", (d_in,), file_path, "Gemma Scope"),
             # ReLU(pre)·1[pre > θ] is ReLU(pre) for θ ≤ 0.
             "threshold": take(arrays, "threshold", (d_sae,), file_path, "Gemma Scope").clamp_min(0)}
    unexpected = sorted(set(arrays) - set(state))
    if unexpected:
        raise FormatError(f"{file_path} holds arrays {unexpected} that a Gemma Scope JumpReLU SAE does not have")
    fields: dict[str, Any] = {
        "architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": False,
        "dtype": dtype or dtype_name(w_enc.dtype), "metadata": {"source_format": NAME},
        **guess_origin(file_path), **(options or {}),
    }
    # The file is the same for an SAE and a transcoder: a target hook point is what makes it one.
    fields["transcoder"] = bool(fields.get("target_hook_point"))
    return make_config(file_path, **fields), state, file_path
