"""Save and load sparse coders: `cfg.json` + `sae_weights.safetensors` in one folder."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_kit.sae.base import CFG_FILENAME, WEIGHTS_FILENAME, SAEConfig, SparseCoder


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_sparse_coder(coder: SparseCoder, path: str | Path) -> None:
    """Write the weights then cfg.json (last, so a folder with cfg.json always has matching weights)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in coder.state_dict().items()}
    _atomic_write(folder / WEIGHTS_FILENAME, lambda p: save_file(tensors, p))
    text = json.dumps(coder.cfg.to_dict(), indent=2, sort_keys=True) + "\n"
    _atomic_write(folder / CFG_FILENAME, lambda p: Path(p).write_text(text))


def load_config(path: str | Path) -> SAEConfig:
    """Read cfg.json from a saved folder."""
    cfg_path = Path(path) / CFG_FILENAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path} holds no {CFG_FILENAME}: not a saved sae-kit SAE folder")
    return SAEConfig.from_dict(json.loads(cfg_path.read_text()))


def load_sparse_coder(path: str | Path, device: str | torch.device = "cpu") -> SparseCoder:
    """Rebuild the architecture named in cfg.json and load its weights strictly."""
    cfg = load_config(path)
    weights = Path(path) / WEIGHTS_FILENAME
    if not weights.exists():
        raise FileNotFoundError(f"{path} has {CFG_FILENAME} but no {WEIGHTS_FILENAME}")
    coder = SparseCoder.from_config(cfg, device=device)
    state = load_file(str(weights), device=str(device))
    own = coder.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad_shapes = [f"{k}: saved {tuple(state[k].shape)} vs expected {tuple(own[k].shape)}"
                  for k in set(own) & set(state) if state[k].shape != own[k].shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(f"weights in {weights} do not fit cfg.json: missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {bad_shapes}")
    coder.load_state_dict(state)
    return coder
