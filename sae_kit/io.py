"""Save and load sparse coders: `cfg.json` + `sae_weights.safetensors` in one folder.

The weights file holds `coder.inference_state_dict()`: parameters and the buffers inference needs (BatchTopK's
`threshold`), under conventional names (JumpReLU stores θ as `threshold`, not its training-time log θ).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from activation_store.storage import atomic_write
from sae_kit.sae.base import CFG_FILENAME, WEIGHTS_FILENAME, SAEConfig, SparseCoder


def load_plain(path: str | Path) -> Any:
    """torch.load of a file holding only tensors and plain data (checkpoints, autointerp records); a file holding
    any other object is refused with a ValueError, never unpickled, since unpickling can run arbitrary code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds objects other than tensors and plain data, so sae-kit did not write it; "
                         f"refusing to unpickle it (delete it to start over): {str(err).splitlines()[0]}") from None


def save_sparse_coder(coder: SparseCoder, path: str | Path) -> None:
    """Write the weights then cfg.json (last, so a folder with cfg.json always has matching weights)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in coder.inference_state_dict().items()}
    atomic_write(folder / WEIGHTS_FILENAME, lambda p: save_file(tensors, p))
    text = json.dumps(coder.cfg.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(folder / CFG_FILENAME, lambda p: Path(p).write_text(text))


def load_config(path: str | Path) -> SAEConfig:
    """Read cfg.json from a saved folder."""
    cfg_path = Path(path) / CFG_FILENAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path} holds no {CFG_FILENAME}: not a saved sae-kit SAE folder")
    return SAEConfig.from_dict(json.loads(cfg_path.read_text()))


def load_sparse_coder(path: str | Path, device: str | torch.device = "cpu") -> SparseCoder:
    """Rebuild the architecture named in cfg.json, load its weights strictly (names and shapes), in eval mode."""
    cfg = load_config(path)
    weights = Path(path) / WEIGHTS_FILENAME
    if not weights.exists():
        raise FileNotFoundError(f"{path} has {CFG_FILENAME} but no {WEIGHTS_FILENAME}")
    coder = SparseCoder.from_config(cfg, device=device)
    state = load_file(str(weights), device=str(device))
    own = coder.inference_state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad_shapes = [f"{k}: saved {tuple(state[k].shape)} vs expected {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(f"weights in {weights} do not fit {CFG_FILENAME} ({cfg.architecture}, d_in={cfg.d_in}, "
                         f"d_sae={cfg.d_sae}): missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {bad_shapes}")
    coder.load_inference_state_dict(state)
    return coder.eval()  # inference: BatchTopK's forward then uses θ, not the batch
