"""sae-kit's own folders: `cfg.json` (our SAEConfig) + `sae_weights.safetensors` (see `sae_kit.io`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor

from sae_kit.formats.common import FormatError, load_safetensors, read_json
from sae_kit.io import save_sparse_coder
from sae_kit.sae.base import CFG_FILENAME, WEIGHTS_FILENAME, SAEConfig, SparseCoder

NAME = "sae-kit"
LOOKS_FOR = f"{CFG_FILENAME} with sae-kit fields (architecture, transcoder, hook_point, ...) + {WEIGHTS_FILENAME}"
MARKERS = {"architecture", "transcoder", "skip_connection", "hook_point"}


def is_native_config(raw: dict[str, Any]) -> bool:
    """True for a cfg.json written by sae-kit (SAELens's shares the file name, not these keys)."""
    return MARKERS <= set(raw) and set(raw) <= {f.name for f in dataclasses.fields(SAEConfig)}


def detect(path: Path) -> bool:
    """A folder holding our cfg.json and weights file."""
    return (path.is_dir() and (path / CFG_FILENAME).is_file() and (path / WEIGHTS_FILENAME).is_file()
            and is_native_config(read_json(path / CFG_FILENAME)))


def config_only(path: str | Path) -> SAEConfig | None:
    """The SAEConfig of a sae-kit folder from its cfg.json alone (no weights read); None when it is not one."""
    path = Path(path)
    cfg_file = path / CFG_FILENAME
    if not (path.is_dir() and cfg_file.is_file()):
        return None
    raw = read_json(cfg_file)
    return SAEConfig.from_dict(raw) if is_native_config(raw) else None


def read(path: Path, dtype: str | None = None, trust_remote_pickle: bool = False,
         options: dict[str, Any] | None = None) -> tuple[SAEConfig, dict[str, Tensor], Path]:
    """Config (with `options` fields replaced) and weights of a sae-kit folder."""
    try:
        cfg = SAEConfig.from_dict(read_json(path / CFG_FILENAME))
        cfg = cfg.replace(**(options or {}), **({"dtype": dtype} if dtype else {}))
    except (TypeError, ValueError) as err:
        raise FormatError(f"{path / CFG_FILENAME}: {err}") from None
    return cfg, load_safetensors(path / WEIGHTS_FILENAME), path / WEIGHTS_FILENAME


def write(coder: SparseCoder, folder: Path) -> None:
    """cfg.json + sae_weights.safetensors, each written atomically."""
    save_sparse_coder(coder, folder)
