"""Released SAEs by name: `from_pretrained(release, sae_id)` over the shipped `pretrained_saes.yaml`."""
from __future__ import annotations

import difflib
import functools
import logging
import re
from importlib import resources
from typing import Any

import torch

log = logging.getLogger(__name__)

REGISTRY_FILE = "pretrained_saes.yaml"
FIELDS = {"repo_id", "format", "model", "hook_point", "target_hook_point", "layer_pattern", "note", "saes", "revision"}


@functools.lru_cache(maxsize=1)
def releases() -> dict[str, dict[str, Any]]:
    """Every release in the registry, checked for its required fields."""
    import yaml

    data = yaml.safe_load(resources.files("sae_kit").joinpath(REGISTRY_FILE).read_text(encoding="utf-8"))
    for name, entry in data.items():
        missing = {"repo_id", "format", "saes"} - set(entry)
        unknown = set(entry) - FIELDS
        if missing or unknown:
            raise ValueError(f"{REGISTRY_FILE}: release {name!r} lacks {sorted(missing)} / has unknown {sorted(unknown)}")
    return data


def sae_paths(release: str) -> dict[str, str]:
    """sae_id → folder path in the repo for one release."""
    saes = releases()[release]["saes"]
    return {s: s for s in saes} if isinstance(saes, list) else dict(saes)


def resolve(release: str, sae_id: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(release entry, folder path in its repo, config fields the files do not record); ValueError naming close
    matches for an unknown release or id."""
    known = releases()
    if release not in known:
        close = difflib.get_close_matches(release, known, n=5, cutoff=0.4)
        raise ValueError(f"unknown release {release!r}; close: {close or sorted(known)[:10]}")
    entry, paths = known[release], sae_paths(release)
    if sae_id not in paths:
        close = difflib.get_close_matches(sae_id, paths, n=5, cutoff=0.4)
        raise ValueError(f"release {release!r} has no SAE {sae_id!r}; close: {close or list(paths)[:5]} "
                         f"({len(paths)} in all)")
    path = paths[sae_id]
    fields: dict[str, Any] = {}
    if entry.get("model"):
        fields["model_name"] = entry["model"]
    if entry.get("hook_point"):
        layer = re.search(entry.get("layer_pattern", r"(\d+)"), path)
        if layer is None:
            raise ValueError(f"{REGISTRY_FILE}: cannot find the layer of {path!r} with {entry.get('layer_pattern')!r}")
        for key in ("hook_point", "target_hook_point"):
            if entry.get(key):
                fields[key] = entry[key].format(layer=int(layer.group(1)))
    return entry, path, fields


def from_pretrained(release: str, sae_id: str, device: str | torch.device = "cpu", **options: Any) -> Any:
    """Download (or read from the hub cache) one released SAE and load it with its format's reader."""
    from sae_kit import hub
    from sae_kit.formats import read_path

    entry, path, fields = resolve(release, sae_id)
    asked = options.pop("format", None)
    if asked is not None and asked != entry["format"]:  # before any download
        raise ValueError(f"release {release!r} is in the {entry['format']!r} format (sae_kit/pretrained_saes.yaml); "
                         f"format={asked!r} cannot change that: drop it, or load a local folder by path")
    if entry.get("note"):
        log.warning("%s: %s", release, entry["note"])
    folder = hub.download(entry["repo_id"], path, revision=options.pop("revision", entry.get("revision")))
    coder = read_path(folder, device=device, format=entry["format"], **{**fields, **options})
    coder.cfg = coder.cfg.replace(metadata={**coder.cfg.metadata, "release": release, "sae_id": sae_id,
                                            "repo_id": entry["repo_id"]})
    return coder
