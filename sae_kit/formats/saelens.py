"""SAELens folders: `cfg.json` + `sae_weights.safetensors` (the 6.x layout; pre-6.0 configs are read too).

SAELens's inference forward, which the reader reproduces exactly:

    x' = norm(x)  (normalize_activations)      pre = (x' − b_dec·apply_b_dec_to_input) W_enc + b_enc
    standard: z = ReLU(pre)     topk: ReLU on the k largest pre     abstopk: signed k largest |pre|
    jumprelu: z = ReLU(pre)·1[pre > θ]        gated: 1[x'W_enc + b_gate > 0] · ReLU(x'(W_enc·e^r_mag) + b_mag)
    ŷ = norm⁻¹(z W_dec + b_dec)   (transcoders: not un-normalised; skip transcoders add x W_skipᵀ, W_skip (d_out, d_in))

`rescale_acts_by_decoder_norm` (TopK family) and a finetuning `scaling_factor` are folded into the weights.
`batchtopk` files are SAELens training checkpoints (`topk_threshold`); SAELens infers with them as JumpReLU with that
one threshold, which is our BatchTopK's inference rule. `expected_average_only_in` carries no factor in the folder:
SAELens's `load_from_disk` then applies none, and so do we unless one is given (`norm_scaling_factor=`).

Writing: every architecture SAELens's inference classes can express; a TopK-family transcoder or a gated
transcoder cannot be, and raises. A known `expected_average_only_in` factor is folded into the weights (SAELens's own
`fold_activation_norm_scaling_factor`), since SAELens would not apply it from the folder. Our training settings and
metadata ride along in `metadata["sae_kit"]` so a round trip restores them; a SAELens source's own metadata that
we have no field for (prepend_bos, context_size, dataset_path, model_from_pretrained_kwargs, ...) is written back.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from activation_store.storage import atomic_write
from sae_kit.formats import native
from sae_kit.formats.common import (
    TRAINING_KNOBS,
    FormatError,
    decoder_row_norms,
    dtype_name,
    fold_latent_scale,
    load_safetensors,
    make_config,
    read_json,
    sae_kit_cfg,
    take,
)
from sae_kit.sae.base import SAEConfig, SparseCoder

log = logging.getLogger(__name__)

NAME = "saelens"
CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
LOOKS_FOR = f"{CFG} with SAELens fields (d_in, d_sae, architecture or hook_name) + {WEIGHTS}"
FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: SAELens reads configs older than 6.0 through a legacy path."""

ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {  # SAELens name → (ours, transcoder, skip connection)
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "abstopk": ("abstopk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "gated": ("gated", False, False),
    "batchtopk": ("batchtopk", False, False),
    "matryoshka_batchtopk": ("batchtopk", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
BATCHTOPK_FAMILY = ("batchtopk", "matryoshka_batchtopk")
"""SAELens training checkpoints; SAELens writes them for inference as JumpReLU with their one threshold, as we do."""
NORMALIZATIONS = {"none": "none", "expected_average_only_in": "expected_average_only_in",
                  "constant_norm_rescale": "constant_norm_rescale", "layer_norm": "layer_norm"}
FOLDED_AT_SAVE = ("covariance_whitening",)
"""SAELens folds these into the weights when it saves; its inference applies nothing for them."""
CARRIED_METADATA = ("model_class_name", "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens",
                    "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path", "dataset_trust_remote_code",
                    "sae_lens_training_version")
"""SAELens metadata we have no field for (how the model was run, on what data), kept from a SAELens source on export;
pre-6.0 configs hold them at the top level."""


def detect(path: Path) -> bool:
    """A folder with cfg.json + sae_weights.safetensors whose config is not sae-kit's."""
    return (path.is_dir() and (path / CFG).is_file() and (path / WEIGHTS).is_file()
            and not native.is_native_config(read_json(path / CFG)))


def _get(raw: dict[str, Any], meta: dict[str, Any], *names: str) -> Any:
    """The first non-null value among metadata[name] and raw[name] (6.x keeps hook names in metadata, 5.x on top)."""
    for name in names:
        for where in (meta, raw):
            if where.get(name) is not None:
                return where[name]
    return None


def _pre_6(raw: dict[str, Any], meta: dict[str, Any]) -> bool:
    """Whether SAELens reads this config through its pre-6.0 path (no version, or one below 6)."""
    version = raw.get("sae_lens_version") or meta.get("sae_lens_version")
    try:
        return not version or int(str(version).split(".")[0]) < 6
    except ValueError:
        return True


def _architecture(raw: dict[str, Any], meta: dict[str, Any], cfg_path: Path) -> tuple[str, bool, bool]:
    name = raw.get("architecture")
    activation = raw.get("activation_fn_str", raw.get("activation_fn"))
    if name is None:  # pre-6.0 without the field: the activation function named the architecture
        name = "topk" if activation == "topk" else "standard"
    elif _pre_6(raw, meta) and activation == "topk" and (raw.get("activation_fn_kwargs") or {}).get("k") is not None:
        # 5.x wrote TopK SAEs as "standard" with activation_fn topk (SAEBench's TopK releases among them); SAELens
        # reads them as TopK, and so do we.
        name = "topk"
    if name not in ARCHITECTURES:
        raise FormatError(f"{cfg_path}: SAELens architecture {name!r} is not supported; supported: "
                          f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _normalization(raw: dict[str, Any], cfg_path: Path) -> str:
    value = raw.get("normalize_activations", "none")
    if isinstance(value, bool):  # pre-6.0
        value = "expected_average_only_in" if value else "none"
    value = value or "none"
    if value in FOLDED_AT_SAVE:
        log.warning("%s says normalize_activations=%r, which SAELens folds into the weights when saving and does not "
                    "apply at inference; loading the weights as they are", cfg_path, value)
        return "none"
    if value not in NORMALIZATIONS:
        raise FormatError(f"{cfg_path}: unknown normalize_activations {value!r}; supported: "
                          f"{sorted([*NORMALIZATIONS, *FOLDED_AT_SAVE])}")
    return NORMALIZATIONS[value]


def read(path: Path, dtype: str | None = None, trust_remote_pickle: bool = False,
         options: dict[str, Any] | None = None) -> tuple[SAEConfig, dict[str, Tensor], Path]:
    """Our config and state dict for a SAELens folder (see the module docstring for the maths kept)."""
    options = dict(options or {})
    cfg_path, weights = path / CFG, path / WEIGHTS
    raw = read_json(cfg_path)
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    arch, transcoder, skip = _architecture(raw, meta, cfg_path)
    ours = meta.get("sae_kit") if isinstance(meta.get("sae_kit"), dict) else {}
    our_cfg = ours.get("config") if isinstance(ours.get("config"), dict) else {}
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{cfg_path} needs integer d_in and d_sae (found d_in={raw.get('d_in')!r}, "
                          f"d_sae={raw.get('d_sae')!r})") from None
    d_out = int(raw.get("d_out") or d_in) if transcoder else d_in
    file = load_safetensors(weights)
    fmt = f"SAELens {raw.get('architecture', 'standard')}"

    def need(key: str, shape: tuple[int, ...]) -> Tensor:
        return take(file, key, shape, weights, fmt)

    state = {"W_enc": need("W_enc", (d_in, d_sae)), "W_dec": need("W_dec", (d_sae, d_out)), "b_dec": need("b_dec", (d_out,))}
    used = {"W_enc", "W_dec", "b_dec"}
    if arch == "gated":
        state.update({k: need(k, (d_sae,)) for k in ("b_gate", "r_mag", "b_mag")})
        used |= {"b_gate", "r_mag", "b_mag"}
    else:
        state["b_enc"] = need("b_enc", (d_sae,))
        used.add("b_enc")
    if arch == "jumprelu":
        key = "threshold" if "threshold" in file or "log_threshold" not in file else "log_threshold"
        theta = need(key, (d_sae,))
        # ReLU(pre)·1[pre > θ] equals ReLU(pre) for any θ ≤ 0, so a negative θ is a zero one.
        state["threshold"] = (theta.exp() if key == "log_threshold" else theta).clamp_min(0)
        used.add(key)
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, float))):
        raise FormatError(f"{cfg_path}: k must be a number (active latents per token), got {k!r}")
    if k is None and arch in ("topk", "abstopk"):
        k = 100  # SAELens's TopKSAEConfig default
    if arch == "batchtopk":
        theta = float(need("topk_threshold", ()))
        used.add("topk_threshold")
        if theta > 0:
            state["threshold"] = torch.tensor(theta, dtype=state["W_enc"].dtype)
        else:  # SAELens infers with JumpReLU at θ ≤ 0: a plain ReLU
            arch = "relu"
    restored = {}
    if arch == "jumprelu" and not transcoder and our_cfg.get("architecture") in BATCHTOPK_FAMILY:
        theta = state["threshold"]
        if len(theta) and bool((theta == theta[0]).all()) and float(theta[0]) > 0:
            # Our BatchTopK written as SAELens's JumpReLU with its one threshold: restore the BatchTopK.
            arch, state["threshold"], k = our_cfg["architecture"], theta[0].clone(), our_cfg.get("k", k)
            if our_cfg.get("matryoshka_widths"):
                restored["matryoshka_widths"] = tuple(our_cfg["matryoshka_widths"])
    if skip:
        state["W_skip"] = need("W_skip", (d_out, d_in)).T
        used.add("W_skip")
    scaling = next((file[key] for key in ("scaling_factor", "finetuning_scaling_factor") if key in file), None)
    if scaling is not None:
        used |= {"scaling_factor", "finetuning_scaling_factor"}
        state["W_dec"] = state["W_dec"] * take({"s": scaling}, "s", (d_sae,), weights, fmt)[:, None]
    unexpected = sorted(set(file) - used)
    if unexpected:
        raise FormatError(f"{weights} holds tensors {unexpected} that a {fmt} SAE does not have; the config's "
                          f"architecture does not match the weights")
    if raw.get("rescale_acts_by_decoder_norm") and arch in ("topk", "abstopk", "batchtopk"):
        # SAELens ranks pre·‖W_dec[i]‖ and decodes z/‖W_dec[i]‖: the same SAE with the norms folded in.
        fold_latent_scale(state, decoder_row_norms(state["W_dec"], weights))

    normalization = _normalization(raw, cfg_path)
    factor = options.pop("norm_scaling_factor", None) or raw.get("norm_scaling_factor")
    factor = factor if normalization == "expected_average_only_in" else None
    if normalization == "expected_average_only_in" and factor is None:
        log.warning("%s: normalize_activations='expected_average_only_in' without a factor; like SAELens's "
                    "load_from_disk, no scaling is applied (pass norm_scaling_factor=... to apply one)", cfg_path)
    knobs = {k: v for k, v in our_cfg.items() if k in TRAINING_KNOBS}
    metadata = ours.get("metadata") if isinstance(ours.get("metadata"), dict) else {}
    fields: dict[str, Any] = {
        "architecture": arch, "d_in": d_in, "d_sae": d_sae, "d_out": d_out if transcoder else None,
        "transcoder": transcoder, "skip_connection": skip,
        # BatchTopK's k may be fractional (an average); ours needs it only before θ exists.
        "k": max(1, round(float(k))) if arch in ("topk", "abstopk", *BATCHTOPK_FAMILY) and k is not None else None,
        "hook_point": _get(raw, meta, "hook_name", "hook_point") or "",
        "target_hook_point": _get(raw, meta, "hook_name_out") if transcoder else None,
        "hook_head_index": _get(raw, meta, "hook_head_index", "hook_point_head_index"),
        "model_name": _get(raw, meta, "model_name") or "",
        "dtype": dtype or dtype_name(raw.get("dtype"), dtype_name(state["W_enc"].dtype)),
        "apply_b_dec_to_input": bool(raw.get("apply_b_dec_to_input", True)) and not transcoder,
        "normalize_activations": normalization, "norm_scaling_factor": factor,
        "metadata": {**metadata, "source_format": NAME, "source_config": raw},
        **restored, **knobs, **options,
    }
    if arch == "batchtopk" and fields["k"] is None:
        raise FormatError(f"{cfg_path}: a batchtopk SAE needs k (average active latents per token)")
    return make_config(cfg_path, **fields), state, weights


def export_name(coder: SparseCoder) -> str:
    """The SAELens architecture our coder is written as; ValueError where SAELens has none that fits."""
    cfg = coder.cfg
    arch = cfg.architecture
    if arch in BATCHTOPK_FAMILY:  # SAELens saves BatchTopK as JumpReLU with its one threshold: our inference rule
        arch = "jumprelu" if float(coder.threshold) > 0 else "topk"
    if cfg.transcoder:
        names = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
                 ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder"}
        if (arch, cfg.skip_connection) not in names:
            raise ValueError(f"SAELens has no {cfg.architecture} transcoder; write this one with format='sae-kit' "
                             f"or 'sparsify' (TopK transcoders), or train a relu / jumprelu transcoder")
        return names[(arch, cfg.skip_connection)]
    name = {"relu": "standard"}.get(arch, arch)
    if name not in ARCHITECTURES or name in BATCHTOPK_FAMILY:  # SAELens infers with neither
        raise ValueError(f"SAELens has no {arch!r} architecture; write this coder with format='sae-kit'")
    return name


def _export(coder: SparseCoder) -> tuple[str, dict[str, Tensor], str]:
    """SAELens architecture name, its state dict and normalisation for our coder; ValueError where none fits."""
    cfg = coder.cfg
    name = export_name(coder)
    state = {k: v.detach().cpu().clone() for k, v in coder.inference_state_dict().items()}
    if cfg.architecture in BATCHTOPK_FAMILY:
        theta = float(state.pop("threshold"))
        if name.startswith("jumprelu"):
            state["threshold"] = torch.full((cfg.d_sae,), theta, dtype=state["W_enc"].dtype)
    if "W_skip" in state:
        state["W_skip"] = state["W_skip"].T  # SAELens: (d_out, d_in)
    norm = cfg.normalize_activations
    if norm == "expected_average_only_in" and cfg.norm_scaling_factor is not None:
        s = cfg.norm_scaling_factor  # SAELens's fold: the encoder sees s·x, an SAE's output is divided by s
        state["W_enc"] = state["W_enc"] * s
        if not cfg.transcoder:
            state["W_dec"], state["b_dec"] = state["W_dec"] / s, state["b_dec"] / s
        norm = "none"
    return name, {k: v.contiguous() for k, v in state.items()}, norm


def _carried_metadata(cfg: SAEConfig) -> dict[str, Any]:
    """The SAELens metadata of the folder `cfg` was read from that our config has no field for."""
    raw = cfg.metadata.get("source_config") if cfg.metadata.get("source_format") == NAME else None
    if not isinstance(raw, dict):
        return {}
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    return {k: v for k in CARRIED_METADATA for v in [meta.get(k, raw.get(k))] if v is not None}


def write(coder: SparseCoder, folder: Path) -> None:
    """A SAELens 6 folder that `sae_lens.SAE.load_from_disk` loads with the same outputs."""
    from safetensors.torch import save_file

    cfg = coder.cfg
    name, state, norm = _export(coder)
    meta: dict[str, Any] = {
        "sae_lens_training_version": None, **_carried_metadata(cfg),
        "sae_lens_version": FORMAT_VERSION, "model_name": cfg.model_name,
        "hook_name": cfg.hook_point, "hook_head_index": cfg.hook_head_index,
        "sae_kit": sae_kit_cfg(cfg, {k: v for k, v in cfg.metadata.items() if k not in ("source_config",)}),
    }
    out: dict[str, Any] = {
        "architecture": name, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": coder.centres_input, "normalize_activations": norm,
        "reshape_activations": "hook_z" if cfg.hook_point.endswith("hook_z") else "none", "metadata": meta,
    }
    if name in ("topk", "abstopk"):
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    if cfg.transcoder:
        out["d_out"] = cfg.d_target
        meta["hook_name_out"] = cfg.target_hook_point
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS, lambda p: save_file(state, p))
    text = json.dumps(out, indent=2, default=str) + "\n"
    atomic_write(folder / CFG, lambda p: Path(p).write_text(text))
