"""Save and load sparse coders: `cfg.json` + `sae_weights.safetensors` in one folder (the sae-kit format).

The weights file holds `coder.inference_state_dict()`: parameters and the buffers inference needs (BatchTopK's
`threshold`), under conventional names (JumpReLU stores θ as `threshold`, not its training-time log θ).
`build_coder` is the one place a coder is rebuilt from a config and such a state dict; the readers of other
toolkits' formats (`sae_kit.formats`) end there too.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

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


def build_coder(cfg: SAEConfig, state: dict[str, torch.Tensor], source: str | Path,
                device: str | torch.device = "cpu") -> SparseCoder:
    """The coder `cfg` describes with the tensors `state` (its `inference_state_dict` names), in eval mode.

    Names and shapes are checked first; a mismatch raises ValueError naming `source` (the file they came from), every
    missing and unexpected name and both shapes of each mismatch. The coder is built without random initialisation.
    """
    try:
        coder = SparseCoder.from_config(cfg, device="meta")  # shapes only: no (d_sae, d_in) random init
        # A non-persistent buffer is not in any state dict, so only a real construction can give its value.
        if set(dict(coder.named_buffers())) - set(coder.state_dict()):
            coder = SparseCoder.from_config(cfg, device="cpu")
    except (RuntimeError, NotImplementedError):  # an architecture whose __init__ needs real tensors
        coder = SparseCoder.from_config(cfg, device="cpu")
    own = coder.inference_state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad_shapes = [f"{k}: file {tuple(state[k].shape)} vs expected {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(f"weights in {source} do not fit the config ({cfg.architecture}, d_in={cfg.d_in}, "
                         f"d_sae={cfg.d_sae}, d_out={cfg.d_target}): missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {bad_shapes}")
    if any(p.is_meta for p in coder.parameters()) or any(b.is_meta for b in coder.buffers()):
        coder = coder.to_empty(device=device)  # keeps each tensor's layout (W_enc is stored latent-major)
    else:
        coder = coder.to(device)
    coder.load_inference_state_dict({k: v.to(device) for k, v in state.items()})
    return coder.eval()  # inference: BatchTopK's forward then uses θ, not the batch
