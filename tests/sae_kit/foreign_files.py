"""Other toolkits' SAE files built from their published specifications, and those toolkits' forwards re-implemented
from the same specifications (never through sae-kit's readers), for the equivalence tests of `sae_kit.formats`.

Everything is float64 so that a 1e-6 comparison tests the mathematics, not rounding.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

DT = torch.float64
SAELENS_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")


def rand(*shape: int, scale: float = 0.3, shift: float = 0.0, gen: torch.Generator | None = None) -> Tensor:
    return torch.randn(*shape, dtype=DT, generator=gen) * scale + shift


def inputs(n: int, d: int, seed: int = 1) -> Tensor:
    """Rows with a nonzero mean and varied norms, so every normalisation has work to do."""
    g = torch.Generator().manual_seed(seed)
    return rand(n, d, scale=1.0, shift=0.5, gen=g) * (1 + torch.rand(n, 1, dtype=DT, generator=g))


# -- SAELens -----------------------------------------------------------------------------------------------------
def saelens_weights(arch: str, d_in: int, d_sae: int, d_out: int, seed: int = 0) -> dict[str, Tensor]:
    """Random weights under SAELens's names and shapes for one inference architecture."""
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": rand(d_in, d_sae, gen=g), "W_dec": rand(d_sae, d_out, gen=g), "b_dec": rand(d_out, scale=0.1, gen=g)}
    if arch == "gated":
        w.update(b_gate=rand(d_sae, scale=0.2, gen=g), r_mag=rand(d_sae, scale=0.2, gen=g),
                 b_mag=rand(d_sae, scale=0.2, gen=g))
    else:
        w["b_enc"] = rand(d_sae, scale=0.2, gen=g)
    if arch.startswith("jumprelu"):
        w["threshold"] = torch.rand(d_sae, dtype=DT, generator=g) * 0.6 - 0.1  # a few ≤ 0: a plain ReLU there
    if arch == "batchtopk":
        w["topk_threshold"] = torch.tensor(0.15, dtype=DT)
    if arch in ("skip_transcoder", "jumprelu_skip_transcoder"):
        w["W_skip"] = rand(d_out, d_in, scale=0.1, gen=g)  # SAELens: (d_out, d_in), applied as x @ W_skip.T
    return w


def write_saelens(folder: Path, cfg: dict[str, Any], weights: dict[str, Tensor]) -> Path:
    """cfg.json + sae_weights.safetensors, as SAELens 6 saves them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def saelens_cfg(arch: str, d_in: int, d_sae: int, d_out: int, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float64", "device": "cpu",
                           "apply_b_dec_to_input": arch not in SAELENS_TRANSCODERS, "normalize_activations": "none",
                           "reshape_activations": "none",
                           "metadata": {"sae_lens_version": "6.5.0", "model_name": "gpt2", "hook_name":
                                        "blocks.3.hook_resid_pre", "hook_head_index": None}}
    if arch in ("topk", "abstopk", "batchtopk"):
        cfg["k"] = 5
    if arch in SAELENS_TRANSCODERS:
        cfg["d_out"] = d_out
        cfg["metadata"]["hook_name"] = "blocks.3.ln2.hook_normalized"
        cfg["metadata"]["hook_name_out"] = "blocks.3.hook_mlp_out"
    cfg.update(extra)
    return cfg


def saelens_forward(cfg: dict[str, Any], w: dict[str, Tensor], x: Tensor,
                    norm_scaling_factor: float | None = None) -> tuple[Tensor, Tensor]:
    """(latents, output) of SAELens's inference SAE for cfg/weights; `norm_scaling_factor` is folded into the
    weights the way SAELens's from_pretrained folds an expected_average_only_in factor."""
    arch, norm = cfg["architecture"], cfg.get("normalize_activations", "none")
    transcoder = arch in SAELENS_TRANSCODERS
    w = dict(w)
    if norm == "expected_average_only_in" and norm_scaling_factor is not None:  # fold_activation_norm_scaling_factor
        s = norm_scaling_factor
        w["W_enc"] = w["W_enc"] * s
        w["W_dec"], w["b_dec"] = w["W_dec"] / s, w["b_dec"] / s
    sae_in = x
    if norm == "constant_norm_rescale":
        coeff = cfg["d_in"] ** 0.5 / x.norm(dim=-1, keepdim=True)
        sae_in = x * coeff
    elif norm == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        xc = x - mu
        std = xc.std(dim=-1, keepdim=True)
        sae_in = xc / (std + 1e-5)
    if cfg.get("apply_b_dec_to_input", True) and not transcoder:
        sae_in = sae_in - w["b_dec"]
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm")) and arch in ("topk", "abstopk", "batchtopk")
    if arch == "gated":
        gate = (sae_in @ w["W_enc"] + w["b_gate"] > 0).to(DT)
        z = gate * F.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    else:
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        if rescale:
            pre = pre * w["W_dec"].norm(dim=-1)
        if arch in ("standard", "transcoder", "skip_transcoder"):
            z = F.relu(pre)
        elif arch == "topk":
            v, i = pre.topk(cfg["k"], dim=-1)
            z = torch.zeros_like(pre).scatter(-1, i, F.relu(v))
        elif arch == "abstopk":
            i = pre.abs().topk(cfg["k"], dim=-1).indices
            z = torch.zeros_like(pre).scatter(-1, i, pre.gather(-1, i))
        elif arch == "batchtopk":  # saved for inference as JumpReLU with the one threshold
            z = F.relu(pre) * (pre > w["topk_threshold"]).to(DT)
        else:  # jumprelu, jumprelu(_skip)_transcoder
            z = F.relu(pre) * (pre > w["threshold"]).to(DT)
    acts = z / w["W_dec"].norm(dim=-1) if rescale else z
    if "scaling_factor" in w:  # pre-6.0 finetuning scaling
        acts = acts * w["scaling_factor"]
    out = acts @ w["W_dec"] + w["b_dec"]
    if not transcoder:
        if norm == "constant_norm_rescale":
            out = out / coeff
        elif norm == "layer_norm":
            out = out * std + mu
    if "W_skip" in w:
        out = out + x @ w["W_skip"].T
    return z, out


# -- sparsify ----------------------------------------------------------------------------------------------------
def write_sparsify(folder: Path, d_in: int, d_sae: int, k: int, transcode: bool = False, skip: bool = False,
                   seed: int = 0, model: str | None = "tiny-model") -> tuple[Path, dict[str, Tensor]]:
    """A sparsify hook-point folder (cfg.json + sae.safetensors) and the run's config.json one level up."""
    g = torch.Generator().manual_seed(seed)
    w = {"encoder.weight": rand(d_sae, d_in, gen=g), "encoder.bias": rand(d_sae, scale=0.2, gen=g),
         "W_dec": rand(d_sae, d_in, gen=g), "b_dec": rand(d_in, scale=0.1, gen=g)}
    if skip:
        w["W_skip"] = rand(d_in, d_in, scale=0.1, gen=g)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": d_sae, "k": k,
           "multi_topk": False, "skip_connection": skip, "transcode": transcode, "d_in": d_in}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(folder / "sae.safetensors"))
    if model is not None:
        (folder.parent / "config.json").write_text(json.dumps({"model": model, "hookpoints": [folder.name]}))
    return folder, w


def sparsify_forward(w: dict[str, Tensor], k: int, x: Tensor, transcode: bool = False) -> tuple[Tensor, Tensor]:
    """sparsify's SparseCoder: encode (ReLU then top-k), decode, skip connection."""
    xin = x if transcode else x - w["b_dec"]
    pre = F.relu(xin @ w["encoder.weight"].T + w["encoder.bias"])
    v, i = pre.topk(k, dim=-1, sorted=False)
    z = torch.zeros_like(pre).scatter(-1, i, v)
    out = z @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        out = out + x @ w["W_skip"].mT
    return z, out


# -- Gemma Scope, Llama Scope, OpenAI, dictionary_learning --------------------------------------------------------
def write_gemma_scope(folder: Path, d_in: int, d_sae: int, seed: int = 0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    p = {"W_enc": rand(d_in, d_sae, gen=g), "W_dec": rand(d_sae, d_in, gen=g), "b_enc": rand(d_sae, scale=0.2, gen=g),
         "b_dec": rand(d_in, scale=0.1, gen=g), "threshold": torch.rand(d_sae, dtype=DT, generator=g) * 0.5}
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.numpy() for k, v in p.items()}
    np.savez(folder / "params.npz", **arrays)
    return arrays


def gemma_scope_forward(p: dict[str, np.ndarray], x: Tensor) -> tuple[Tensor, Tensor]:
    """Gemma Scope's JumpReLU: the encoder reads x uncentred."""
    t = {k: torch.from_numpy(v) for k, v in p.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    z = (pre > t["threshold"]).to(DT) * F.relu(pre)
    return z, z @ t["W_dec"] + t["b_dec"]


def write_llama_scope(folder: Path, d_in: int, d_sae: int, seed: int = 0) -> tuple[dict[str, Any], dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    hp = {"d_model": d_in, "d_sae": d_sae, "hook_point_in": "blocks.4.hook_resid_post",
          "hook_point_out": "blocks.4.hook_resid_post", "jump_relu_threshold": 0.05, "act_fn": "jumprelu",
          "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": 3.0, "out": 3.0}}
    w = {"encoder.weight": rand(d_sae, d_in, gen=g), "encoder.bias": rand(d_sae, scale=0.2, gen=g),
         "decoder.weight": rand(d_in, d_sae, gen=g), "decoder.bias": rand(d_in, scale=0.1, gen=g)}
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    save_file(w, str(folder / "checkpoints" / "final.safetensors"))
    return hp, w


def llama_scope_forward(hp: dict[str, Any], w: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """SAELens's reading of Llama Scope: inputs scaled by s = √d / avg norm, threshold jump_relu_threshold·s."""
    s = hp["d_model"] ** 0.5 / hp["dataset_average_activation_norm"]["in"]
    pre = (x * s) @ w["encoder.weight"].T + w["encoder.bias"]
    z = F.relu(pre) * (pre > hp["jump_relu_threshold"] * s).to(DT)
    return z, (z @ w["decoder.weight"].T + w["decoder.bias"]) / s


def write_openai(path: Path, d_in: int, d_sae: int, k: int | None, seed: int = 0) -> dict[str, Any]:
    """The state dict `sparse_autoencoder.Autoencoder.state_dict()` saves (activation name and settings included)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {"pre_bias": rand(d_in, scale=0.1, gen=g), "encoder.weight": rand(d_sae, d_in, gen=g),
                          "latent_bias": rand(d_sae, scale=0.2, gen=g), "decoder.weight": rand(d_in, d_sae, gen=g),
                          "stats_last_nonzero": torch.zeros(d_sae, dtype=torch.long),
                          "latents_activation_frequency": torch.ones(d_sae),
                          "latents_mean_square": torch.zeros(d_sae)}
    if k is None:
        sd["activation"] = "ReLU"
    else:
        sd["activation"], sd["activation_state_dict"] = "TopK", {"k": k, "postact_fn": "ReLU"}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd


def openai_forward(sd: dict[str, Any], x: Tensor) -> tuple[Tensor, Tensor]:
    """Autoencoder.encode / decode; layer norm exactly when the activation is TopK (their from_state_dict)."""
    topk = sd["activation"] == "TopK"
    if topk:
        mu = x.mean(dim=-1, keepdim=True)
        xc = x - mu
        std = xc.std(dim=-1, keepdim=True)
        x = xc / (std + 1e-5)
    pre = F.linear(x - sd["pre_bias"], sd["encoder.weight"], sd["latent_bias"])
    if topk:
        v, i = torch.topk(pre, k=sd["activation_state_dict"]["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, i, F.relu(v))
    else:
        z = F.relu(pre)
    out = F.linear(z, sd["decoder.weight"]) + sd["pre_bias"]
    if topk:
        out = out * std + mu
    return z, out


def write_dictionary_learning(folder: Path, dict_class: str, d_in: int, d_sae: int, k: int = 5,
                              seed: int = 0) -> dict[str, Tensor]:
    """ae.pt + config.json as dictionary_learning's trainers save them."""
    g = torch.Generator().manual_seed(seed)
    if dict_class == "JumpReluAutoEncoder":
        sd = {"W_enc": rand(d_in, d_sae, gen=g), "b_enc": rand(d_sae, scale=0.2, gen=g), "W_dec": rand(d_sae, d_in, gen=g),
              "b_dec": rand(d_in, scale=0.1, gen=g), "threshold": torch.rand(d_sae, dtype=DT, generator=g) * 0.3}
    elif dict_class == "GatedAutoEncoder":
        sd = {"decoder_bias": rand(d_in, scale=0.1, gen=g), "encoder.weight": rand(d_sae, d_in, gen=g),
              "r_mag": rand(d_sae, scale=0.2, gen=g), "gate_bias": rand(d_sae, scale=0.2, gen=g),
              "mag_bias": rand(d_sae, scale=0.2, gen=g), "decoder.weight": rand(d_in, d_sae, gen=g)}
    else:
        sd = {"encoder.weight": rand(d_sae, d_in, gen=g), "encoder.bias": rand(d_sae, scale=0.2, gen=g),
              "decoder.weight": rand(d_in, d_sae, gen=g)}
        sd["bias" if dict_class == "AutoEncoder" else "b_dec"] = rand(d_in, scale=0.1, gen=g)
        if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
            sd["k"] = torch.tensor(k, dtype=torch.int)
            sd["threshold"] = torch.tensor(0.2 if dict_class == "BatchTopKSAE" else -1.0, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "ae.pt")
    trainer = {"dict_class": dict_class, "trainer_class": "X", "activation_dim": d_in, "dict_size": d_sae, "k": k,
               "layer": 2, "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_2"}
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
    return sd


def dictionary_learning_forward(dict_class: str, sd: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """Each dictionary class's default encode / decode."""
    if dict_class == "AutoEncoder":
        z = F.relu(F.linear(x - sd["bias"], sd["encoder.weight"], sd["encoder.bias"]))
        return z, F.linear(z, sd["decoder.weight"]) + sd["bias"]
    if dict_class == "AutoEncoderTopK":
        post = F.relu(F.linear(x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
        v, i = post.topk(int(sd["k"]), sorted=False, dim=-1)
        z = torch.zeros_like(post).scatter_(-1, i, v)
        return z, F.linear(z, sd["decoder.weight"]) + sd["b_dec"]
    if dict_class == "BatchTopKSAE":  # encode(use_threshold=True), the default
        post = F.relu(F.linear(x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
        z = post * (post > sd["threshold"].to(DT))
        return z, F.linear(z, sd["decoder.weight"]) + sd["b_dec"]
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input = False
        pre = x @ sd["W_enc"] + sd["b_enc"]
        z = F.relu(pre * (pre > sd["threshold"])) * sd["W_dec"].norm(dim=1)
        return z, (z / sd["W_dec"].norm(dim=1)) @ sd["W_dec"] + sd["b_dec"]
    if dict_class == "GatedAutoEncoder":
        x_enc = F.linear(x - sd["decoder_bias"], sd["encoder.weight"])
        f_gate = (x_enc + sd["gate_bias"] > 0).to(DT)
        f = f_gate * F.relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])
        n = sd["decoder.weight"].norm(dim=0, keepdim=True)
        z = f * n
        return z, F.linear(z / n, sd["decoder.weight"]) + sd["decoder_bias"]
    raise ValueError(dict_class)
