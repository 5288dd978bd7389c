"""Pieces every format reader and writer shares: errors that name the file and the fix, safe file reading, the
checks on foreign tensors, and the exact weight folds that move a toolkit's scalings into ours."""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

DTYPES = ("float32", "float64", "bfloat16", "float16")
READ_OPTIONS = ("model_name", "hook_point", "target_hook_point", "norm_scaling_factor", "hook_head_index")
"""Config fields a caller (or the release registry) may supply where a format does not record them."""
TRAINING_KNOBS = ("k_aux", "auxk_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold",
                  "sparsity_coefficient", "target_l0", "input_scale")
"""Our training settings a foreign format has no field for; exports embed them and imports restore them."""


class FormatError(ValueError):
    """A file that is not what its format requires; the message names the file and what would fix it."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or FormatError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FormatError(f"{path} is not valid JSON ({err}); re-download or re-export it") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} holds a JSON {type(data).__name__}, expected an object of config fields")
    return data


def load_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, on CPU."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise FormatError(f"{path} is not a readable safetensors file ({err}); re-download it") from None


def load_pickle(path: Path, trust_remote_pickle: bool = False) -> Any:
    """A torch pickle (`.pt`, `.bin`) read with `weights_only=True` (tensors, numbers, strings, dicts only).

    Anything that needs full unpickling (which can run arbitrary code) is refused unless `trust_remote_pickle`.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the refused class ("Unsupported global: ..."); anything else is a damaged or foreign file,
        # which full unpickling would not read either.
        text = str(err)
        detail = text[text.find("Unsupported"):].splitlines()[0].strip() if "Unsupported" in text else ""
        if not detail.startswith("Unsupported global"):
            raise FormatError(f"{path} is not a readable torch pickle ({detail or type(err).__name__}); the file is "
                              f"damaged or not a .pt/.bin of weights: re-download it") from None
        if not trust_remote_pickle:
            reason = detail.split(" Please use")[0]  # torch's advice next is the very step refused here
            raise FormatError(
                f"{path} is a pickle that needs full unpickling, which can run arbitrary code ({reason}). Load it "
                f"with trust_remote_pickle=True only if you trust where it came from, or convert it to safetensors"
            ) from None
    log.warning("fully unpickling %s (trust_remote_pickle=True)", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def take(state: dict[str, Any], key: str, shape: tuple[int, ...], source: Path, fmt: str) -> Tensor:
    """state[key] checked to be a tensor of `shape`; FormatError naming the file, the key and both shapes."""
    if key not in state:
        found = sorted(k for k, v in state.items() if isinstance(v, Tensor))
        raise FormatError(f"{source} has no tensor {key!r}, which a {fmt} SAE needs (tensors found: {found}); "
                          f"the file is incomplete or not a {fmt} SAE")
    value = state[key]
    if not isinstance(value, Tensor):
        raise FormatError(f"{source}: {key!r} is a {type(value).__name__}, expected a tensor of shape {shape}")
    if tuple(value.shape) != tuple(shape):
        raise FormatError(f"{source}: {key!r} has shape {tuple(value.shape)} but the config gives {tuple(shape)}; "
                          f"the weights and the config describe different SAEs")
    return value


def dtype_name(value: Any, fallback: str = "float32") -> str:
    """Our dtype name ("float32", ...) from "torch.float32", "float32" or a torch.dtype; fallback if unknown."""
    name = str(value).removeprefix("torch.") if value is not None else ""
    return name if name in DTYPES else fallback


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """The reader options that are config fields, validated by name."""
    unknown = sorted(set(options) - set(READ_OPTIONS))
    if unknown:
        raise ValueError(f"unknown load options {unknown}; valid: {list(READ_OPTIONS)} (and device, dtype, "
                         f"trust_remote_pickle, subfolder, revision, format)")
    return {k: v for k, v in options.items() if v is not None}


@torch.no_grad()
def fold_latent_scale(state: dict[str, Tensor], scale: Tensor, biases: tuple[str, ...] = ("b_enc",),
                      thresholds: tuple[str, ...] = ()) -> None:
    """Latent i's activation multiplied by scale[i] > 0, folded into the weights in place: W_enc[:, i], the encoder
    biases and thresholds × scale[i], W_dec[i] ÷ scale[i]. Decoding is unchanged; positive scales keep every sign,
    so ReLU, JumpReLU and gate decisions are unchanged (TopK ranks change: fold only where the source ranks the
    scaled values)."""
    state["W_enc"] = state["W_enc"] * scale
    for name in (*biases, *thresholds):
        state[name] = state[name] * scale
    state["W_dec"] = state["W_dec"] / scale[:, None]


def decoder_row_norms(w_dec: Tensor, source: Path) -> Tensor:
    """‖W_dec[i]‖ (d_sae,), FormatError if a row is zero (its latent's scale is undefined)."""
    norms = w_dec.norm(dim=1)
    if not bool((norms > 0).all()):
        raise FormatError(f"{source}: decoder rows {(norms == 0).nonzero().flatten()[:5].tolist()} are all zero, but "
                          f"this format scales latents by decoder norms; the file is damaged")
    return norms


def sae_kit_cfg(cfg: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    """What a foreign format cannot hold of our config, to embed in its files so a round trip restores it."""
    kept = {k: v for k, v in cfg.to_dict().items() if k not in ("metadata",)}
    return {"config": kept, "metadata": metadata}


def make_config(source: Path, **fields: Any) -> Any:
    """SAEConfig(**fields); a field it rejects becomes a FormatError naming the file it was read from."""
    import sae_kit.sae  # noqa: F401  (registers every architecture)
    from sae_kit.sae.base import SAEConfig, SparseCoder

    arch = fields.get("architecture")
    if arch not in SparseCoder.REGISTRY:
        raise FormatError(f"{source} holds a {arch!r} sparse coder, and this sae-kit has no {arch!r} architecture "
                          f"(available: {sorted(SparseCoder.REGISTRY)})")
    try:
        return SAEConfig(**fields)
    except (TypeError, ValueError) as err:
        raise FormatError(f"{source}: {err}") from None
