"""Other toolkits' SAE files, read into sae-kit coders with the same outputs, and ours written back in theirs.

    load("runs/sae/topk")                          # any supported folder (or file): the format is detected
    load("google/gemma-scope-2b-pt-res", subfolder="layer_5/width_16k/average_l0_68")   # a hub repo
    load("gemma-scope-2b-pt-res-canonical:layer_5/width_16k/canonical")                  # the release registry
    save(coder, "out/", format="saelens")           # "sae-kit", "saelens" or "sparsify"

One module per format, each with `detect(path)`, `read(path, dtype, trust_remote_pickle, options)` returning our
config, a state dict in our names and the file it came from, and (where we export) `write(coder, folder)`.
Input normalisation a format applies becomes the coder's `normalize_activations`, never dropped.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from sae_kit.formats import dictionary_learning, gemma_scope, llama_scope, native, openai, saelens, sparsify
from sae_kit.formats.common import DTYPES, FormatError, check_options

READERS: tuple[ModuleType, ...] = (native, saelens, sparsify, gemma_scope, llama_scope, dictionary_learning, openai)
"""In detection order: the first whose `detect` accepts the path reads it."""
WRITERS: dict[str, ModuleType] = {"sae-kit": native, "saelens": saelens, "sparsify": sparsify}
FORMATS = tuple(m.NAME for m in READERS)

__all__ = ["FORMATS", "FormatError", "READERS", "WRITERS", "detect_format", "load", "read_path", "save"]


def detect_format(path: str | Path) -> ModuleType:
    """The reader module for a folder or file; FileNotFoundError listing what each format looks for otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no SAE at {str(path)!r}: the path does not exist")
    for reader in READERS:
        if reader.detect(path):
            return reader
    held = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:20] if path.is_dir() else [path.name]
    wanted = "; ".join(f"{m.NAME}: {m.LOOKS_FOR}" for m in READERS)
    raise FileNotFoundError(f"{str(path)!r} matches no supported SAE format (it holds {held}). Looked for: {wanted}. "
                            f"For a release of several SAEs, point at one SAE's folder (or pass subfolder=)")


def read_path(path: str | Path, device: str | torch.device = "cpu", format: str | None = None,
              dtype: str | None = None, trust_remote_pickle: bool = False, **options: Any) -> Any:
    """Load the SAE in a local folder or file; `format` skips detection; `options` are config fields the format
    does not record (model_name, hook_point, target_hook_point, norm_scaling_factor, hook_head_index)."""
    from sae_kit.io import build_coder

    path, options = Path(path), check_options(options)
    if format is not None:
        by_name = {m.NAME: m for m in READERS}
        if format not in by_name:
            raise ValueError(f"unknown format {format!r}; valid: {list(by_name)}")
        reader = by_name[format]
        if not path.exists():
            raise FileNotFoundError(f"no SAE at {str(path)!r}: the path does not exist")
    else:
        reader = detect_format(path)
    if dtype is not None and str(dtype).removeprefix("torch.") not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {list(DTYPES)}")
    cfg, state, source = reader.read(path, dtype=None if dtype is None else str(dtype).removeprefix("torch."),
                                     trust_remote_pickle=trust_remote_pickle, options=options)
    if "norm_scaling_factor" in options and cfg.normalize_activations != "expected_average_only_in":
        raise ValueError(f"norm_scaling_factor={options['norm_scaling_factor']} applies only to an SAE normalised "
                         f"with 'expected_average_only_in'; {str(path)!r} is normalised with "
                         f"{cfg.normalize_activations!r}, which would ignore it (leave the factor out)")
    coder = build_coder(cfg, state, source, device=device)
    coder.source_path = path  # where it came from (push_to_hub looks for metrics.json beside it)
    return coder


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/.+)?")


def load(spec: str | Path, device: str | torch.device = "cpu", subfolder: str | None = None,
         revision: str | None = None, **options: Any) -> Any:
    """A coder from a local path, "release:sae_id" (the shipped registry) or a hub id ("org/repo" or
    "org/repo/sub/folder"; `subfolder` as well), in that order of precedence."""
    from sae_kit import hub, registry

    text = str(spec)
    local = Path(text).expanduser()
    if local.exists():
        return read_path(local / subfolder if subfolder else local, device=device, **options)
    release, sep, sae_id = text.partition(":")
    if sep and "/" not in release and not release.startswith((".", "~")):  # "release:sae_id"
        if subfolder:
            raise ValueError(f"subfolder={subfolder!r} goes with a hub id or a local path; {text!r} names one SAE "
                             f"of a release already")
        try:
            registry.resolve(release, sae_id)
        except ValueError as err:  # an unknown release or id: name the close ones
            raise ValueError(f"{err} ({text!r} is not a local path either)") from None
        return registry.from_pretrained(release, sae_id, device=device,
                                        **({"revision": revision} if revision else {}), **options)
    if _HUB_ID.fullmatch(text) and not text.startswith((".", "/", "~")):
        parts = text.split("/")
        repo_id, rest = "/".join(parts[:2]), "/".join(parts[2:])
        sub = "/".join(p.strip("/") for p in (rest, subfolder or "") if p.strip("/")) or None
        try:
            folder = hub.download(repo_id, sub, revision)
        except FileNotFoundError as err:  # a mistyped local path looks like a hub id too: say both
            raise FileNotFoundError(f"no local path {text!r}, and as a hub id: {err}") from None
        return read_path(folder, device=device, **options)
    raise FileNotFoundError(f"no SAE at {text!r}: not a local path, not 'release:sae_id' of a known release "
                            f"(see sae_kit/pretrained_saes.yaml), and not a hub id 'org/repo'")


def save(coder: Any, path: str | Path, format: str = "sae-kit") -> None:
    """Write the coder into the folder `path` in one of WRITERS' formats (ValueError where it cannot be expressed)."""
    if format not in WRITERS:
        raise ValueError(f"unknown format {format!r}; valid: {list(WRITERS)}")
    WRITERS[format].write(coder, Path(path))
