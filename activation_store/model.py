"""One model object over two backends: TransformerLens hook names (TransformerBridge) or plain forward hooks.

Both backends expose the same surface: `.tokenizer`, `.hook_points` (name → width), `__call__(tokens)`
→ logits (batch, pos, vocab), `capture(tokens, hook_points)` with an early stop after the deepest hook
point needed, `intervene({hook_point: fn})` to edit activations inside a `with` block, and `generate`.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

REFERENCE_NAME = "reference"
BACKENDS = ("auto", "transformer_lens", "hf")

Edit = Callable[[Tensor], Tensor | None]
"""An activation edit: receives (batch, pos, width) and returns the replacement, or None to keep it."""


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once every needed activation is captured."""


class ModelNotAvailable(FileNotFoundError):
    """A model could not be loaded: no such local folder, and not on (or not reachable on) the Hugging Face hub.

    Its message is one line saying what was looked for and what to do, as every command prints it.
    """


def reference_model_path() -> Path:
    """Folder of the embedded reference model shipped inside the package."""
    return Path(__file__).resolve().parent / "assets" / "reference"


def resolve_model_name(name_or_path: str) -> str:
    """Map the alias "reference" to the shipped folder; anything else is a hub name or local path."""
    if name_or_path == REFERENCE_NAME:
        path = reference_model_path()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"the embedded reference model is missing from {path}; "
                "rebuild it with `python -m activation_store.train_reference`"
            )
        return str(path)
    return name_or_path


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def max_positions(config: Any) -> int | None:
    """The longest context a transformers config declares (None when it names none)."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return None


def usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; ValueError naming it when this machine has no such accelerator."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA device here (torch "
                         f"{torch.__version__}); use cpu, or install a CUDA build of torch")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but MPS is not available here; use cpu")
    return dev


def _on(mask: Tensor | None, device: torch.device) -> Tensor | None:
    """An attention mask on the model's device, like the tokens it goes with."""
    return None if mask is None else mask.to(device)


def closest_names(name: str, valid: Sequence[str], n: int = 5) -> list[str]:
    """The valid names most similar to `name`, for error messages."""
    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.5)
    return close or list(valid[:n])


class LoadedModel:
    """A causal LM with named hook points; subclasses implement one backend."""

    backend: str = ""
    generate_with_cache: bool = True
    """Whether `generate` may decode with the KV cache (never where a backend's cache is known to be wrong)."""

    def __init__(self, name: str, tokenizer: Any, device: torch.device):
        self.name = name
        self.tokenizer = tokenizer
        self.device = device
        self._widths: dict[str, int] = {}
        self._order: dict[str, int] = {}  # firing order of hook points, for early stopping
        self._head_shapes: dict[str, tuple[int, int]] = {}  # hook points flattened over heads

    # -- what every backend provides -----------------------------------------------------------------
    def _forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    @contextmanager
    def _raw_hooks(self, fns: dict[str, Callable[[Tensor], Tensor | None]]) -> Iterator[None]:
        """Attach fns to hook points (raw backend tensors); remove them on exit, whatever happens."""
        raise NotImplementedError
        yield

    @contextmanager
    def _edit_hooks(self, fns: dict[str, Callable[[Tensor], Tensor | None]]) -> Iterator[None]:
        """Attach edits to hook points so each rewrites what the model reads there; remove them on exit."""
        with self._raw_hooks(fns):
            yield

    def hf_model(self) -> nn.Module:
        """The underlying `transformers` model (for `generate` and the config)."""
        raise NotImplementedError

    # -- shared surface --------------------------------------------------------------------------------
    @property
    def hook_points(self) -> dict[str, int]:
        """Every hook point with its activation width (hook_z-style points flattened over heads)."""
        return dict(self._widths)

    def list_hook_points(self) -> list[str]:
        """Hook point names in the order the forward pass reaches them."""
        return sorted(self._widths, key=lambda n: self._order[n])

    def validate_hook_point(self, name: str) -> str:
        """Return the name if valid, else raise ValueError naming the closest valid hook points."""
        if name not in self._widths:
            raise ValueError(
                f"unknown hook point {name!r} for model {self.name!r} ({self.backend} backend); "
                f"closest valid: {closest_names(name, self.list_hook_points())} "
                "(`sae-kit hooks --model M` lists them all)"
            )
        return name

    def width(self, hook_point: str) -> int:
        """Activation width at a hook point."""
        return self._widths[self.validate_hook_point(hook_point)]

    @property
    def n_ctx(self) -> int:
        """Longest context the model accepts."""
        return max_positions(self.hf_model().config) or 2048

    def check_context_size(self, context_size: int) -> None:
        """ValueError when contexts of this many tokens are longer than the model's position embeddings reach."""
        if context_size > self.n_ctx:
            raise ValueError(f"context_size {context_size} exceeds {self.name!r}'s maximum context of {self.n_ctx} "
                             f"tokens; choose a context size of at most {self.n_ctx}")

    @property
    def bos_token_id(self) -> int | None:
        """Token the model expects at the start of a document, if any."""
        tok_bos = getattr(self.tokenizer, "bos_token_id", None)
        return tok_bos if tok_bos is not None else getattr(self.hf_model().config, "bos_token_id", None)

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool = True) -> Tensor:
        """Tokenize text (one string or a list padded to the longest) to (batch, pos) on the model's device."""
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prepend_bos and self.bos_token_id is not None:
            rows = [[self.bos_token_id, *r] for r in rows]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.bos_token_id or 0)
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(self.device)

    def __call__(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits (batch, pos, vocab) for token ids (batch, pos)."""
        return self._forward(tokens.to(self.device), _on(attention_mask, self.device))

    def _flatten(self, name: str, act: Tensor) -> Tensor:
        # hook_z arrives as (batch, pos, n_heads, d_head); SAEs read it concatenated over heads.
        return act.flatten(-2) if name in self._head_shapes else act

    def _unflatten(self, name: str, act: Tensor) -> Tensor:
        return act.unflatten(-1, self._head_shapes[name]) if name in self._head_shapes else act

    @torch.no_grad()
    def capture(
        self, tokens: Tensor, hook_points: Sequence[str], stop_early: bool = True,
        attention_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Activations (batch, pos, width) at each hook point from one forward pass.

        With stop_early the forward ends right after the deepest requested hook point fires, so later layers
        cost nothing; the captured values are identical either way.
        """
        if isinstance(hook_points, str):  # one hook point, not its characters
            hook_points = [hook_points]
        names = [self.validate_hook_point(h) for h in dict.fromkeys(hook_points)]
        if not names:
            raise ValueError("capture needs at least one hook point")
        last = max(names, key=lambda n: self._order[n])
        out: dict[str, Tensor] = {}

        def make(name: str) -> Callable[[Tensor], None]:
            def fn(act: Tensor) -> None:
                out[name] = self._flatten(name, act).detach()
                if stop_early and name == last and all(n in out for n in names):
                    raise StopForward
            return fn

        try:
            with self._raw_hooks({n: make(n) for n in names}):
                self._forward(tokens.to(self.device), _on(attention_mask, self.device))
        except StopForward:
            pass
        missing = [n for n in names if n not in out]
        if missing:
            raise RuntimeError(f"hook points {missing} did not fire during the forward pass of {self.name!r}")
        return out

    @contextmanager
    def intervene(self, edits: dict[str, Edit]) -> Iterator[LoadedModel]:
        """Inside the block, each edit rewrites the activation (batch, pos, width) at its hook point.

        Edits see hook_z flattened over heads, like `capture`; an edit of hook_resid_mid changes the residual stream
        (as in TransformerLens), not only ln2's input. Hooks are removed on exit even after an error.
        """
        for name in edits:
            self.validate_hook_point(name)

        def make(name: str, edit: Edit) -> Callable[[Tensor], Tensor | None]:
            def fn(act: Tensor) -> Tensor | None:
                new = edit(self._flatten(name, act))
                return None if new is None else self._unflatten(name, new).to(act.dtype)
            return fn

        with self._edit_hooks({n: make(n, e) for n, e in edits.items()}):
            yield self

    def generate(self, tokens: Tensor, max_new_tokens: int = 20, **kwargs: Any) -> Tensor:
        """Continue (batch, pos) token ids with the `transformers` generate loop (KV cache unless the backend's is wrong)."""
        kwargs.setdefault("do_sample", False)
        kwargs["use_cache"] = kwargs.get("use_cache", True) and self.generate_with_cache
        pad = self.tokenizer.pad_token_id
        kwargs.setdefault("pad_token_id", pad if pad is not None else self.bos_token_id)
        attention_mask = kwargs.pop("attention_mask", torch.ones_like(tokens))
        return self.hf_model().generate(
            tokens.to(self.device), attention_mask=attention_mask.to(self.device),
            max_new_tokens=max_new_tokens, **kwargs,
        )

    def layer_of(self, hook_point: str) -> int | None:
        """Block index a hook point belongs to, or None outside the blocks."""
        m = re.search(r"(?:blocks|h|layers|layer)\.(\d+)\b", hook_point)
        return int(m.group(1)) if m else None

    _PROBE_LEN = 7  # odd length so (batch, pos, heads, d_head) is not confused with attention patterns
    # Two rows, so tensors shared by the batch (rotary cos/sin, shape (1, pos, d)) are not taken for activations.
    _PROBE_BATCH = 2

    def _probe(self) -> None:
        """Record each hook point's width and firing order with a short dry forward pass."""
        seq = self._PROBE_LEN
        for order, (name, shape) in enumerate(self._probe_shapes(seq).items()):
            if len(shape) == 3 and shape[:2] == (self._PROBE_BATCH, seq) and shape[2] > 1:
                self._widths[name] = shape[2]
            elif len(shape) == 4 and shape[:2] == (self._PROBE_BATCH, seq) and not re.search(r"pattern|scores", name):
                self._widths[name] = shape[2] * shape[3]
                self._head_shapes[name] = (shape[2], shape[3])
            else:
                continue
            self._order[name] = order

    def _probe_shapes(self, seq: int) -> dict[str, tuple[int, ...]]:
        """Shapes of every candidate activation on a (_PROBE_BATCH, seq) input, in firing order."""
        raise NotImplementedError


class TransformerLensModel(LoadedModel):
    """TransformerLens hook names (`blocks.3.hook_resid_post`, `blocks.3.attn.hook_z`) via TransformerBridge."""

    backend = "transformer_lens"
    # TransformerLens 4.3's bridge under transformers 5.24 returns wrong logits from cached decoding steps (0.1–0.3
    # off the full forward on a tiny GPT-2; exact with 5.23): recomputing the prefix each step stays exact.
    generate_with_cache = False

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, hf_model: nn.Module | None = None,
                 tokenizer: Any = None):
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(resolve_model_name(name), device=str(device), dtype=dtype,
                                                     hf_model=hf_model, tokenizer=tokenizer)
        bridge.eval()
        super().__init__(name, bridge.tokenizer, device)
        self.bridge = bridge
        self._mid_parts: dict[str, tuple[str, str]] = {}  # hook_resid_mid → (its hook_resid_pre, hook_attn_out)
        self._probe()

    def _probe_shapes(self, seq: int) -> dict[str, tuple[int, ...]]:
        # The cache holds canonical names and TransformerLens aliases (hook_resid_post, attn.hook_z, ...),
        # in the order the forward reaches them; researchers know the aliases, so both are valid.
        tokens = torch.zeros(self._PROBE_BATCH, seq, dtype=torch.long, device=self.device)
        with torch.no_grad():
            _, cache = self.bridge.run_with_cache(tokens)
        self._mid_parts = _resid_mid_parts(cache)
        return {name: tuple(act.shape) for name, act in cache.items()}

    def _forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is not None:
            return self.bridge(tokens, attention_mask=attention_mask)
        return self.bridge(tokens)

    @contextmanager
    def _raw_hooks(self, fns: dict[str, Callable[[Tensor], Tensor | None]]) -> Iterator[None]:
        hooks = [(name, _tl_adapter(fn)) for name, fn in fns.items()]
        with self.bridge.hooks(fwd_hooks=hooks):
            yield

    @contextmanager
    def _edit_hooks(self, fns: dict[str, Callable[[Tensor], Tensor | None]]) -> Iterator[None]:
        # The bridge's hook_resid_mid is ln2's input: an edit there reaches the MLP but not the residual the block
        # adds the MLP's output to. HookedTransformer's edits the residual itself, so the edit is made on the
        # attention output instead, as edit(pre + attn_out) − pre, which both the residual and ln2 then read.
        hooks = [(name, fn) for name, fn in fns.items() if not _RESID_MID.fullmatch(name)]
        for name, fn in fns.items():
            if not _RESID_MID.fullmatch(name):
                continue
            if name not in self._mid_parts:
                raise ValueError(f"cannot edit {name!r} of {self.name!r}: its block's residual after attention is not "
                                 "hook_resid_pre + hook_attn_out, so an edit there would not reach the residual "
                                 "stream; edit the hook_attn_out or hook_resid_pre of that block instead")
            pre_name, attn_name = self._mid_parts[name]
            # After every direct edit, so pre and attn_out are the values the block adds.
            hooks += _resid_mid_edit(pre_name, attn_name, fn)
        with self.bridge.hooks(fwd_hooks=[(name, _tl_adapter(fn)) for name, fn in hooks]):
            yield

    def hf_model(self) -> nn.Module:
        return self.bridge.original_model


_RESID_MID = re.compile(r"blocks\.(\d+)\.hook_resid_mid")


def _resid_mid_parts(cache: Any) -> dict[str, tuple[str, str]]:
    """Each hook_resid_mid in a probe forward's cache that equals its block's hook_resid_pre + hook_attn_out."""
    parts = {}
    for name in cache.keys():
        if not (m := _RESID_MID.fullmatch(name)):
            continue
        pre, attn = f"blocks.{m.group(1)}.hook_resid_pre", f"blocks.{m.group(1)}.hook_attn_out"
        if pre in cache and attn in cache and torch.allclose(cache[pre] + cache[attn], cache[name],
                                                             rtol=1e-3, atol=1e-5):
            parts[name] = (pre, attn)
    return parts


def _resid_mid_edit(pre_name: str, attn_name: str, fn: Callable[[Tensor], Tensor | None]
                    ) -> list[tuple[str, Callable[[Tensor], Tensor | None]]]:
    """Hooks that apply `fn` to pre + attn_out and hand the block edit(pre + attn_out) − pre as its attn_out."""
    seen: dict[str, Tensor] = {}

    def keep_pre(act: Tensor) -> None:
        seen["pre"] = act

    def edit(attn_out: Tensor) -> Tensor | None:
        pre = seen.pop("pre")
        new = fn(pre + attn_out)
        return None if new is None else new.to(attn_out.dtype) - pre

    return [(pre_name, keep_pre), (attn_name, edit)]


def _tl_adapter(fn: Callable[[Tensor], Tensor | None]) -> Callable[[Tensor, Any], Tensor | None]:
    def hook(act: Tensor, hook: Any) -> Tensor | None:
        return fn(act)
    return hook


class HFModel(LoadedModel):
    """Plain `transformers` forward hooks; hook points are module paths (`transformer.h.3.mlp`)."""

    backend = "hf"

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, hf_model: nn.Module | None = None,
                 tokenizer: Any = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model_name(name)
        model = hf_model if hf_model is not None else AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.to(device).eval()
        super().__init__(name, tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path), device)
        self.model = model
        self._modules = dict(model.named_modules())
        self._takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        self._probe()

    def _probe_shapes(self, seq: int) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}

        def recorder(name: str) -> Callable[[Tensor], None]:
            def fn(act: Tensor) -> None:
                shapes.setdefault(name, tuple(act.shape))
            return fn

        tokens = torch.zeros(self._PROBE_BATCH, seq, dtype=torch.long, device=self.device)
        with torch.no_grad(), self._raw_hooks({n: recorder(n) for n in self._modules if n}):
            self._forward(tokens, None)
        return shapes

    def _forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        extra = {}
        if attention_mask is not None and self._takes_position_ids:
            # Positions count real tokens only, as TransformerLens and `generate` count them: without them a model
            # with absolute position embeddings (GPT-2) reads a left-padded row at shifted positions.
            extra["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.model(input_ids=tokens, attention_mask=attention_mask, use_cache=False, **extra).logits

    @contextmanager
    def _raw_hooks(self, fns: dict[str, Callable[[Tensor], Tensor | None]]) -> Iterator[None]:
        handles = []
        try:
            for name, fn in fns.items():
                handles.append(self._modules[name].register_forward_hook(_hf_adapter(fn)))
            yield
        finally:
            for h in handles:
                h.remove()

    def hf_model(self) -> nn.Module:
        return self.model


def _hf_adapter(fn: Callable[[Tensor], Tensor | None]) -> Callable[..., Any]:
    # Decoder blocks return tuples (hidden, ...); the activation is the first element.
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        act = output[0] if isinstance(output, tuple) else output
        if not isinstance(act, Tensor):
            return None
        new = fn(act)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook


def load_model(
    name_or_path: str = REFERENCE_NAME,
    backend: str = "auto",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
) -> LoadedModel:
    """Load a Hugging Face causal LM (hub name, local folder, or "reference") behind named hook points.

    backend "transformer_lens" gives TransformerLens hook names through TransformerBridge; "hf" gives module
    paths with plain forward hooks; "auto" tries TransformerLens and falls back to "hf" for architectures it
    does not know.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
    dev = usable_device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {dtype!r}; valid: float32, bfloat16, float16")
        dtype = getattr(torch, dtype)
    try:
        return _load(name_or_path, backend, dev, dtype)
    except ModelNotAvailable:
        raise
    except ValueError as err:
        unknown = _unknown_family(name_or_path, err)
        if unknown is None:
            raise
        raise unknown from err
    except OSError as err:  # transformers' "not a local folder, not on the hub, offline" all arrive as OSError
        if name_or_path == REFERENCE_NAME and isinstance(err, FileNotFoundError):
            raise  # the embedded model is missing: its own message says how to rebuild it
        raise _not_available(name_or_path, err) from err


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _not_available(name: str, err: OSError) -> ModelNotAvailable:
    """The one-line error for a model that could not be loaded: what was looked for, and what to do."""
    cause = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    folder = resolve_model_name(name)
    if os.path.isdir(folder):
        looked = f"the local folder {folder!r} holds no model transformers can load ({cause})"
        todo = "point --model at a folder written by save_pretrained (config.json, weights, tokenizer)"
    else:
        hub = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if _offline()
               else "the Hugging Face hub has no such model or could not be reached")
        looked = f"{name!r} is no local folder, and {hub}"
        todo = ("unset HF_HUB_OFFLINE and connect once to download it, " if _offline()
                else "check the name and the network (or set HF_HUB_OFFLINE=1 to use the cache only), ")
        todo += "or pass the path of a local folder written by save_pretrained"
    return ModelNotAvailable(f"could not load model {name!r}: {looked}; {todo}, "
                             f"or use --model {REFERENCE_NAME} (the embedded model)")


def _unknown_family(name: str, err: Exception) -> ValueError | None:
    """The one-line error for a config whose model_type transformers has no class for; None for other errors."""
    m = re.search(r"model type `([^`]+)` but Transformers does not recognize", str(err))
    if m is None:
        return None
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    known = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return ValueError(f"could not load model {name!r}: its config names model_type {m.group(1)!r}, which transformers "
                      f"{transformers.__version__} has no class for; closest known causal LM types: "
                      f"{closest_names(m.group(1), known)} ({len(known)} in all); a newer transformers may know it")


def _load(name_or_path: str, backend: str, dev: torch.device, dtype: torch.dtype) -> LoadedModel:
    if backend == "hf":
        return HFModel(name_or_path, dev, dtype)
    try:
        return TransformerLensModel(name_or_path, dev, dtype)
    except (FileNotFoundError, OSError) as err:
        if backend == "transformer_lens" or not os.path.exists(resolve_model_name(name_or_path)):
            raise
        log.warning("TransformerBridge could not load %s (%s); using plain forward hooks", name_or_path, err)
        return HFModel(name_or_path, dev, dtype)
    except Exception as err:  # architectures TransformerLens does not know raise assorted errors
        if backend == "transformer_lens" or _unknown_family(name_or_path, err) is not None:
            raise  # nor would transformers' own classes load a model_type it does not know
        log.warning("TransformerBridge could not load %s (%s); using plain forward hooks", name_or_path, err)
        return HFModel(name_or_path, dev, dtype)
