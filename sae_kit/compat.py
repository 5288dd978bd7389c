"""Whether a saved SAE fits a model: its recorded model and hook points against the requested ones (from cfg.json,
before any weights load), then its hook points and widths against the loaded model.

Every command that applies an SAE to a model (eval, interp, steer) runs both checks, so a wrong pairing fails at
once with one clear line instead of after minutes of loading, or, worse, silently when the widths happen to agree.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from activation_store.model import REFERENCE_NAME, LoadedModel, resolve_model_name
from sae_kit.sae.base import CFG_FILENAME, SAEConfig

log = logging.getLogger(__name__)


def recorded_model(cfg: SAEConfig) -> str | None:
    """The model an SAE was trained on, from cfg.model_name or its metadata (None when it records none)."""
    meta = cfg.metadata or {}
    for value in (cfg.model_name, meta.get("model"), meta.get("model_name")):
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            return value["name"]
    return None


def _local_folder(name: str) -> str | None:
    """The folder a model name points at on this machine, if it does ("reference" included)."""
    try:
        path = resolve_model_name(name)
    except FileNotFoundError:
        return None
    return os.path.realpath(path) if os.path.isdir(path) else None


def _same_model(recorded: str, requested: str) -> bool | None:
    """True or False when it can tell whether two model names mean one model; None when it cannot (a hub name
    against a local folder may be that model's copy)."""
    if recorded == requested:
        return True
    a, b = _local_folder(recorded), _local_folder(requested)
    if a is not None and b is not None:
        if a == b:
            return True
        try:  # a copy of the same folder (say, moved to another disk) has the same config
            with open(os.path.join(a, "config.json"), "rb") as fa, open(os.path.join(b, "config.json"), "rb") as fb:
                return fa.read() == fb.read()
        except OSError:
            return False
    if a is None and b is None:
        return False  # two hub names
    return None


def check_requested(cfg: SAEConfig, where: str, model: str | None = None, hook_point: str | None = None) -> None:
    """Raise ValueError when the SAE described by `cfg` (its cfg.json, read without the weights) was trained on
    another model or hook point than the requested ones; None requests nothing."""
    if hook_point is not None and cfg.hook_point and hook_point != cfg.hook_point:
        raise ValueError(f"SAE {where!r} reads hook point {cfg.hook_point!r} (its {CFG_FILENAME}), but "
                         f"{hook_point!r} was requested; pick an SAE trained at {hook_point!r}")
    recorded = recorded_model(cfg)
    if model is None or recorded is None:
        return
    same = _same_model(recorded, model)
    if same is False:
        raise ValueError(f"SAE {where!r} was trained on model {recorded!r} (its {CFG_FILENAME}), but model "
                         f"{model!r} was requested; leave --model out to use {recorded!r}, or pick an SAE trained "
                         f"on {model!r}")
    if same is None:
        log.warning("SAE %s was trained on model %r; using %r as that model (a local copy?)", where, recorded, model)


def model_to_use(cfg: SAEConfig, requested: str | None) -> str:
    """The requested model, else the recorded one, else the embedded reference model."""
    return requested or recorded_model(cfg) or REFERENCE_NAME


def check_compatible(model: LoadedModel, sae: Any, where: str = "") -> None:
    """Raise ValueError when the SAE's hook points (an SAE or its SAEConfig) are missing from the model or have
    another width there."""
    cfg: SAEConfig = getattr(sae, "cfg", sae)
    label = where or cfg.hook_point
    if cfg.hook_head_index is not None:
        raise ValueError(f"SAE {label!r} reads one attention head (hook_head_index={cfg.hook_head_index}) of "
                         f"{cfg.hook_point!r}; evals, interp and steering run SAEs on whole hook points only")
    hooks = [("hook_point", cfg.hook_point, cfg.d_in, "d_in")]
    if cfg.transcoder:
        hooks.append(("target_hook_point", cfg.target_hook_point, cfg.d_target, "d_out"))
    for field_name, hook, width, dim in hooks:
        if not hook:
            fmt = cfg.metadata.get("source_format")
            if fmt and fmt != "sae-kit":  # Gemma Scope and OpenAI files have no field for it, and no cfg.json
                raise ValueError(f"SAE {label!r} records no {field_name} (its {fmt} files have none); write it as a "
                                 f"sae-kit folder that does: sae-kit convert SRC DST --to sae-kit "
                                 f"--{field_name.replace('_', '-')} HOOK (a hook point of model {model.name!r})")
            raise ValueError(f"SAE {label!r} records no {field_name} in its {CFG_FILENAME}; set it to a hook point "
                             f"of model {model.name!r}")
        have = model.width(hook)  # ValueError naming the closest hook points if unknown
        if have != width:
            raise ValueError(f"SAE {label!r} expects width {width} at {field_name} {hook!r} ({dim}={width}), but "
                             f"model {model.name!r} has width {have} there: this SAE was trained on a different "
                             f"model or hook point")
    if cfg.transcoder:
        # The splice reads the input and rewrites the target in one forward pass, so the input must fire first.
        order = {name: i for i, name in enumerate(model.list_hook_points())}
        if order[cfg.target_hook_point] < order[cfg.hook_point]:
            raise ValueError(f"transcoder {label!r} reads {cfg.hook_point!r}, which model {model.name!r} reaches only "
                             f"after its target {cfg.target_hook_point!r}: a transcoder's input must come before the "
                             f"output it predicts (e.g. blocks.L.mlp.hook_in → blocks.L.hook_mlp_out)")
