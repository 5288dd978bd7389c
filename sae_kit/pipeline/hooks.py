"""A model's hook points from its config alone: no weights are downloaded or loaded.

`hook_widths(config)` builds a randomly initialised model of the same architecture at reduced width (the layer
count is kept, or cut to the deepest layer asked about), wraps it in the same adapter `load_model` uses, and
reads its hook points. Widths are mapped back to the real model's: the reduced sizes are chosen distinct
(hidden 48, MLP 80, vocab 96, ...), so each reduced width names the config field it came from. A width that no
field explains is reported as None.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

from activation_store.model import BACKENDS, REFERENCE_NAME, LoadedModel, resolve_model_name

log = logging.getLogger(__name__)

HIDDEN, MLP, VOCAB = 48, 80, 96
"""Reduced hidden, MLP and vocabulary sizes: distinct, so a reduced width names its config field."""
# Config field names per role, over the architectures transformers knows (GPT-2 spells them its own way).
HIDDEN_FIELDS = ("hidden_size", "n_embd", "d_model")
MLP_FIELDS = ("intermediate_size", "n_inner", "ffn_dim")
HEAD_FIELDS = ("num_attention_heads", "n_head")
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")


def _first(cfg: Any, names: Iterable[str]) -> str | None:
    return next((n for n in names if getattr(cfg, n, None) is not None), None)


def n_layers(config: Any) -> int | None:
    """Number of transformer blocks a config describes."""
    name = _first(config, LAYER_FIELDS)
    return int(getattr(config, name)) if name else None


def reduced_config(config: Any, layers: int | None = None) -> tuple[Any, dict[int, int]]:
    """A copy of `config` at reduced width (and `layers` blocks if given), and the map reduced width → real width."""
    small = copy.deepcopy(config)
    real: dict[int, int] = {}
    hidden = _first(config, HIDDEN_FIELDS)
    if hidden is None:
        raise ValueError(f"cannot find the hidden size in the {type(config).__name__} (looked for {HIDDEN_FIELDS})")
    h = int(getattr(config, hidden))
    setattr(small, hidden, HIDDEN)
    real[HIDDEN] = h
    heads_name = _first(config, HEAD_FIELDS)
    explicit_head_dim = getattr(config, "head_dim", None)
    if heads_name:
        n_heads = int(getattr(config, heads_name))
        head_dim = int(explicit_head_dim) if explicit_head_dim else h // n_heads
        # Where the head size is its own field (Gemma), heads × head_dim may differ from the hidden size: keep the
        # reduced product distinct from HIDDEN too.
        small_heads, small_head_dim = (2, 8) if explicit_head_dim else (4, HIDDEN // 4)
        setattr(small, heads_name, small_heads)
        if explicit_head_dim:
            small.head_dim = small_head_dim
        real.setdefault(small_heads * small_head_dim, n_heads * head_dim)
        kv = getattr(config, "num_key_value_heads", None)
        if kv:
            small_kv = small_heads if int(kv) == n_heads else 1
            small.num_key_value_heads = small_kv
            real.setdefault(small_kv * small_head_dim, int(kv) * head_dim)
    mlp = _first(config, MLP_FIELDS)
    if mlp:
        real[MLP] = int(getattr(config, mlp))
        setattr(small, mlp, MLP)
    else:  # GPT-2 style: n_inner None means 4 × hidden
        real[4 * HIDDEN] = 4 * h
    if getattr(config, "vocab_size", None):
        real[VOCAB] = int(config.vocab_size)
        small.vocab_size = VOCAB
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            value = getattr(small, name, None)
            if isinstance(value, int) and value >= VOCAB:
                setattr(small, name, 0)
            elif isinstance(value, list):
                setattr(small, name, [v if v < VOCAB else 0 for v in value])
    if layers is not None:
        name = _first(config, LAYER_FIELDS)
        if name:
            setattr(small, name, layers)
            for list_field in ("layer_types",):  # per-layer lists (Gemma-2's sliding/full attention) follow the count
                values = getattr(small, list_field, None)
                if isinstance(values, list) and len(values) > layers:
                    setattr(small, list_field, values[:layers])
    return small, real


def model_from_config(config: Any, name: str, backend: str = "auto") -> LoadedModel:
    """The model adapter over a randomly initialised model built from `config` (CPU, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from activation_store.model import HFModel, TransformerLensModel, reference_model_path

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config)
    # Any tokenizer serves: the probe runs token id 0 only. The embedded model's is local.
    tokenizer = AutoTokenizer.from_pretrained(reference_model_path())
    device, dtype = torch.device("cpu"), torch.float32
    if backend == "hf":
        return HFModel(name, device, dtype, hf_model=hf, tokenizer=tokenizer)
    try:
        return TransformerLensModel(name, device, dtype, hf_model=hf, tokenizer=tokenizer)
    except Exception as err:  # same fallback as load_model: architectures TransformerLens does not know
        if backend == "transformer_lens":
            raise
        log.debug("TransformerBridge cannot wrap %s (%s); using module paths", name, err)
        return HFModel(name, device, dtype, hf_model=hf, tokenizer=tokenizer)


def hook_widths(config: Any, name: str = "model", backend: str = "auto",
                deepest_layer: int | None = None) -> tuple[dict[str, int | None], str]:
    """{hook point: width of the real model (None where unknown)} and the backend that named them.

    With `deepest_layer`, blocks after it are left out of the reduced model (their hook points with them).
    """
    layers = n_layers(config)
    keep = None if deepest_layer is None or layers is None else min(layers, deepest_layer + 1)
    small, real = reduced_config(config, keep)
    model = model_from_config(small, name, backend)
    return {h: real.get(w) for h, w in model.hook_points.items()}, model.backend


def load_hf_config(model: str) -> Any:
    """The transformers config of a model name, local folder or "reference" (reads config.json only)."""
    from transformers import AutoConfig

    path = resolve_model_name(model) if model == REFERENCE_NAME else model
    return AutoConfig.from_pretrained(path)
