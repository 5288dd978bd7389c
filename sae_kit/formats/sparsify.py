"""EleutherAI sparsify folders: one per hook point, `cfg.json` + `sae.safetensors` (and the run's `config.json` one
level up, which names the model).

sparsify's forward, which the reader reproduces exactly:

    pre = (x − b_dec·[not transcode]) encoder.weightᵀ + encoder.bias,   z = TopK_k(ReLU(pre))
    ŷ = z W_dec + b_dec (+ x W_skipᵀ with skip_connection)       W_dec (d_sae, d_in), W_skip (d_in, d_in)

Only the "topk" activation is read ("groupmax" is refused). The folder name is a module path under the model's
`base_model` (`layers.12`, `layers.12.mlp`, `h.3`); it becomes a TransformerLens hook point where the pattern is
known (a block's output → `blocks.12.hook_resid_post`; a transcoder on an MLP reads the module's input,
`blocks.12.mlp.hook_in` (after ln2's weight and bias, unlike `ln2.hook_normalized`), and writes
`blocks.12.hook_mlp_out`; on attention, `attn.hook_in` → `hook_attn_out`; the old layer-indexed `layer_12` is the
block's input, `hook_resid_pre`), and stays as it is otherwise. The original name is kept in
metadata["sparsify_hookpoint"].

Writing: TopK SAEs and transcoders with d_out = d_in, no per-row input normalisation; our settings sparsify has no
field for go to `sae_kit.json` beside its files (sparsify ignores it; our reader restores them). Our coders that do not centre
their input get b_enc + b_dec·W_enc as encoder bias (the same pre-activations), and a known
expected_average_only_in factor is folded into the weights.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from activation_store.storage import atomic_write
from sae_kit.formats.common import (
    TRAINING_KNOBS,
    FormatError,
    dtype_name,
    load_safetensors,
    make_config,
    read_json,
    sae_kit_cfg,
    take,
)
from sae_kit.sae.base import SAEConfig, SparseCoder

NAME = "sparsify"
CFG, WEIGHTS, RUN_CONFIG = "cfg.json", "sae.safetensors", "config.json"
EXTRAS = "sae_kit.json"
"""Our settings sparsify has no field for (hook points, model, training knobs, metadata), beside its two files."""
LOOKS_FOR = f"{CFG} (d_in, k, num_latents / expansion_factor) + {WEIGHTS}"
_LAYER = r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)"
_ATTN = r"(?:self_attn|attn|attention)"


def detect(path: Path) -> bool:
    """A folder with cfg.json + sae.safetensors."""
    return path.is_dir() and (path / CFG).is_file() and (path / WEIGHTS).is_file()


def hook_points(hookpoint: str, transcoder: bool) -> tuple[str, str | None]:
    """(input hook point, target hook point or None) in TransformerLens names for a sparsify module path."""
    if m := re.fullmatch(_LAYER, hookpoint):
        n = m.group(1)
        return (f"blocks.{n}.hook_resid_pre", f"blocks.{n}.hook_resid_post") if transcoder \
            else (f"blocks.{n}.hook_resid_post", None)
    if m := re.fullmatch(_LAYER + r"\.mlp", hookpoint):
        n = m.group(1)
        # sparsify's transcoders hook the module and read its input: ln2's output with its weight and bias applied
        return (f"blocks.{n}.mlp.hook_in", f"blocks.{n}.hook_mlp_out") if transcoder \
            else (f"blocks.{n}.hook_mlp_out", None)
    if m := re.fullmatch(_LAYER + r"\." + _ATTN, hookpoint):
        n = m.group(1)
        return (f"blocks.{n}.attn.hook_in", f"blocks.{n}.hook_attn_out") if transcoder \
            else (f"blocks.{n}.hook_attn_out", None)
    if m := re.fullmatch(r"layer_(\d+)", hookpoint):  # the `sae` library's output_hidden_states index
        return f"blocks.{m.group(1)}.hook_resid_pre", None
    if hookpoint in ("embed_tokens", "wte", "embed_in"):
        return "hook_embed", None
    return hookpoint, hookpoint if transcoder else None


def read(path: Path, dtype: str | None = None, trust_remote_pickle: bool = False,
         options: dict[str, Any] | None = None) -> tuple[SAEConfig, dict[str, Tensor], Path]:
    """Our config and state dict for one sparsify hook-point folder."""
    options = dict(options or {})
    cfg_path, weights = path / CFG, path / WEIGHTS
    raw = read_json(cfg_path)
    if raw.get("activation", "topk") != "topk":
        raise FormatError(f"{cfg_path}: sparsify activation {raw['activation']!r} is not supported; only 'topk' is")
    if raw.get("signed"):
        raise FormatError(f"{cfg_path}: signed sparsify SAEs are not supported")
    try:
        d_in = int(raw["d_in"])
        d_sae = int(raw.get("num_latents") or d_in * int(raw.get("expansion_factor", 32)))
        k = int(raw.get("k", 32))
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{cfg_path} needs integer d_in, k and num_latents or expansion_factor (found "
                          f"{ {key: raw.get(key) for key in ('d_in', 'k', 'num_latents', 'expansion_factor')} })") from None
    transcoder, skip = bool(raw.get("transcode", False)), bool(raw.get("skip_connection", False))
    file = load_safetensors(weights)
    fmt = "sparsify"
    if "W_dec" not in file:
        raise FormatError(f"{weights} has no decoder ('W_dec'): it was saved without one (decoder=False), so it "
                          f"cannot reconstruct; use a sparsify checkpoint saved with its decoder")
    state = {"W_enc": take(file, "encoder.weight", (d_sae, d_in), weights, fmt).T,
             "b_enc": take(file, "encoder.bias", (d_sae,), weights, fmt),
             "W_dec": take(file, "W_dec", (d_sae, d_in), weights, fmt),
             "b_dec": take(file, "b_dec", (d_in,), weights, fmt)}
    if skip:
        state["W_skip"] = take(file, "W_skip", (d_in, d_in), weights, fmt).T  # sparsify adds x @ W_skip.mT
    unexpected = sorted(set(file) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip"})
    if unexpected:
        raise FormatError(f"{weights} holds tensors {unexpected} that a sparsify TopK coder does not have")
    ours = read_json(path / EXTRAS) if (path / EXTRAS).is_file() else {}
    ours_cfg = ours.get("config") or {}
    run = read_json(path.parent / RUN_CONFIG) if (path.parent / RUN_CONFIG).is_file() else {}
    hook, target = hook_points(path.name, transcoder)
    fields: dict[str, Any] = {
        "architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k, "d_out": d_in if transcoder else None,
        "transcoder": transcoder, "skip_connection": skip,
        "hook_point": ours_cfg.get("hook_point") or hook,
        "target_hook_point": ours_cfg.get("target_hook_point") or target,
        "model_name": ours_cfg.get("model_name") or run.get("model") or "",
        "dtype": dtype or dtype_name(state["W_enc"].dtype),
        "metadata": {**(ours.get("metadata") or {}), "source_format": NAME, "source_config": raw,
                     "sparsify_hookpoint": path.name, **({"source_run_config": run} if run else {})},
        **{k: v for k, v in ours_cfg.items() if k in TRAINING_KNOBS}, **options,
    }
    return make_config(cfg_path, **fields), state, weights


def _other_formats(coder: SparseCoder) -> str:
    """The formats that can hold a coder sparsify cannot."""
    from sae_kit.formats import saelens

    try:
        saelens.export_name(coder)
    except ValueError:
        return "format='sae-kit'"
    return "format='saelens' or 'sae-kit'"


def write(coder: SparseCoder, folder: Path) -> None:
    """A sparsify hook-point folder that `sparsify.SparseCoder.load_from_disk` loads with the same outputs."""
    from safetensors.torch import save_file

    cfg = coder.cfg
    if cfg.architecture != "topk":
        raise ValueError(f"sparsify holds TopK coders only; this one is {cfg.architecture!r}: write it with "
                         f"{_other_formats(coder)}")
    if cfg.d_target != cfg.d_in:
        raise ValueError(f"sparsify transcoders map d_in to d_in; this one maps {cfg.d_in} to {cfg.d_target}: write it "
                         f"with format='sae-kit'")
    norm = cfg.normalize_activations
    scale = cfg.norm_scaling_factor if norm == "expected_average_only_in" else None
    if norm in ("layer_norm", "constant_norm_rescale"):
        raise ValueError(f"sparsify cannot normalise inputs per row (normalize_activations={norm!r}); write this "
                         f"coder with {_other_formats(coder)}")
    state = {k: v.detach().cpu().clone() for k, v in coder.inference_state_dict().items()}
    w_enc, b_enc, w_dec, b_dec = state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"]
    if scale is not None:  # encoder sees s·x; an SAE's output is divided by s
        w_enc = w_enc * scale
        if not cfg.transcoder:
            w_dec, b_dec = w_dec / scale, b_dec / scale
    if not cfg.transcoder and not coder.centres_input:
        b_enc = b_enc + b_dec @ w_enc  # sparsify always subtracts b_dec: (x − b_dec)W + b_enc' = xW + b_enc
    tensors = {"encoder.weight": w_enc.T.contiguous(), "encoder.bias": b_enc.contiguous(),
               "W_dec": w_dec.contiguous(), "b_dec": b_dec.contiguous()}
    if cfg.skip_connection:
        tensors["W_skip"] = state["W_skip"].T.contiguous()
    raw = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in), "normalize_decoder": True,
           "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False, "skip_connection": cfg.skip_connection,
           "transcode": cfg.transcoder, "d_in": cfg.d_in}
    extras = sae_kit_cfg(cfg, {k: v for k, v in cfg.metadata.items() if k != "source_config"})
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, p))
    atomic_write(folder / EXTRAS, lambda p: Path(p).write_text(json.dumps(extras, indent=2, default=str) + "\n"))
    text = json.dumps(raw, indent=2, default=str) + "\n"
    atomic_write(folder / CFG, lambda p: Path(p).write_text(text))
