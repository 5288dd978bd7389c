"""Shared base for every sparse coder: SAEs and (skip) transcoders.

A sparse coder maps an input x ∈ R^{d_in} to latents z ∈ R^{d_sae} and reconstructs a target
y ∈ R^{d_out} (y = x for an SAE; the MLP output for a transcoder):

    z  = act(W_encᵀ(n(x) − b_dec·[SAE]) + b_enc)
    ŷ  = n⁻¹(W_decᵀ z + b_dec) (+ W_skipᵀ x for a skip transcoder)

n is the input normalisation of SAEs imported from other toolkits (`normalize_activations`, identity for SAEs
trained here); n⁻¹ undoes it with the statistics of the same input row (SAEs only: a transcoder's output is left as
it comes, as SAELens does). Every public encode / decode / encode_sparse / decode_sparse goes through
`encoder_input` and `_add_bias_and_skip`, which apply it.

Parameters keep the field's conventional names and shapes so other toolkits' files map onto them:
`W_enc` [d_in, d_sae], `W_dec` [d_sae, d_out], `b_enc` [d_sae], `b_dec` [d_out], `W_skip` [d_in, d_out],
`threshold` [d_sae] (JumpReLU) or [] (BatchTopK's single inference threshold).

Each architecture is one file subclassing `SparseCoder`, registered by setting its `architecture` class attribute.
"""
from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_kit.sae import kernels

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
"""Input normalisations (SAELens's names): identity; x·norm_scaling_factor; x·√d_in/‖x‖; per-row layer norm
(x − mean)/(std + 1e-5), the OpenAI release's. The last two are undone on the output with the same row's statistics,
the first with the same factor."""
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True, kw_only=True)
class ArchitectureKnobs:
    """Architecture-specific settings, declared once for `SAEConfig` (saved in cfg.json) and the trainer's
    `TrainConfig`, which passes them through; each architecture ignores the others' knobs."""

    k_aux: int | None = None
    """Dead latents used by the AuxK loss; None means d_out // 2 (half the predicted residual's width; d_in // 2 for
    an SAE)."""
    auxk_coefficient: float = 1 / 32
    """Weight of the AuxK loss (Gao et al.)."""
    jumprelu_bandwidth: float = 0.05
    """Rectangle-kernel bandwidth ε of the JumpReLU straight-through estimator. Gemma Scope's 0.001 is for inputs
    of unit mean squared norm; the trainer scales them to E‖x‖² = d_in, where pre-activations are √d_in larger, so
    0.05 is theirs at d_in ≈ 2500 (and SAELens's default). 0.001 is also below the bf16 spacing of pre-activations
    near θ ~ 1 (2⁻⁸), so under bf16 autocast almost no pre-activation lands in the window."""
    jumprelu_init_threshold: float = 0.001
    """Initial θ of every JumpReLU latent."""
    target_l0: float | None = None
    """JumpReLU: if set, penalise (L0/target_l0 − 1)² instead of plain λ·L0."""
    matryoshka_widths: tuple[int, ...] | None = None
    """Matryoshka: sizes of the nested dictionaries (each a prefix of the latents), strictly increasing, the last
    equal to d_sae (SAELens' `matryoshka_widths`); None: prefixes from the group fractions 1/32, 1/16, 1/8, 1/4 and
    the rest (Bussmann et al.'s defaults). The trainer's config also takes a comma-separated string."""
    mp_residual_threshold: float = 0.01
    """Matching pursuit: a row stops early once ‖residual‖ ≤ this fraction of ‖x − b_dec‖ (0: always k steps)."""
    kron_m: int = 4
    """KronSAE: pre-latents per head on the first factor (m); d_sae = heads · m · n."""
    kron_n: int = 4
    """KronSAE: pre-latents per head on the second factor (n)."""
    adaptivek_min_k: int | None = None
    """AdaptiveK: fewest active latents of a token; None means k // 4 (the paper's 20 for a budget of 80)."""
    adaptivek_max_k: int | None = None
    """AdaptiveK: most active latents of a token; None means 4·k (the paper's 320), capped at d_sae."""
    adaptivek_probe_coefficient: float = 0.05
    """AdaptiveK: weight of the complexity probe's regression loss (the paper's probe_weight)."""
    adaptivek_l1_coefficient: float = 0.005
    """AdaptiveK: weight of the L1 term mean‖z‖₁ / mean‖x‖₂ (the paper's l1_weight)."""

    def knobs(self) -> dict[str, Any]:
        """These settings as keyword arguments (for the other config class)."""
        return {f.name: getattr(self, f.name) for f in fields(ArchitectureKnobs)}

    def _fields_then_knobs(self) -> dict[str, Any]:
        """`dataclasses.asdict`, the subclass's own fields first (a saved config opens with its architecture)."""
        d = dataclasses.asdict(self)
        knobs = {f.name for f in fields(ArchitectureKnobs)}
        return {**{k: v for k, v in d.items() if k not in knobs}, **{k: v for k, v in d.items() if k in knobs}}


@dataclass(frozen=True)
class SAEConfig(ArchitectureKnobs):
    """Everything needed to rebuild a sparse coder; serialised as `cfg.json`."""

    architecture: str
    """Registry name: "topk", "batchtopk", "jumprelu", "abstopk", "relu", "matryoshka_batchtopk", "gated",
    "matching_pursuit", "kron" or "adaptivek"."""
    d_in: int
    """Width of the input activations."""
    d_sae: int
    """Number of latents."""
    k: int | None = None
    """Active latents per token for the TopK family (None for JumpReLU / ReLU)."""
    d_out: int | None = None
    """Width of the target; None means d_in (an SAE). Set for transcoders whose output width differs."""
    transcoder: bool = False
    """True when the target is another hook point (MLP in → MLP out); the input is then not centred by b_dec."""
    skip_connection: bool = False
    """Add a linear skip path W_skip x (zero-initialised): a skip transcoder."""
    hook_point: str = ""
    """Hook point the input is read from."""
    target_hook_point: str | None = None
    """Hook point the target is read from (transcoders only)."""
    model_name: str = ""
    """Model the coder was trained on (hub name, local path or "reference")."""
    dtype: str = "float32"
    """Parameter dtype as saved."""
    sparsity_coefficient: float = 0.0
    """Final λ of the L0 (JumpReLU) or decoder-norm-weighted L1 (ReLU) penalty."""
    input_scale: float = 1.0
    """Scale the saved weights already absorb: 1.0 after folding; kept for provenance."""
    apply_b_dec_to_input: bool = True
    """SAEs: subtract b_dec from the (normalised) input before encoding. False for encoders that read x as it is
    (Gemma Scope, Llama Scope, dictionary_learning's JumpReLU). Transcoders never subtract it."""
    normalize_activations: str = "none"
    """Input normalisation applied by encode and undone by decode: one of NORMALIZATIONS. Set for SAEs imported from
    toolkits that normalise at run time; SAEs trained here fold their scaling into the weights ("none")."""
    norm_scaling_factor: float | None = None
    """The factor of "expected_average_only_in" (x is multiplied by it before encoding); None: not known, so the
    normalisation is recorded but not applied (as SAELens's `load_from_disk` does)."""
    hook_head_index: int | None = None
    """Attention head the input is read from, when the hook point has a head axis (SAELens `hook_head_index`)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form training provenance (tokens seen, normalisation, dataset, metrics)."""

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.matryoshka_widths is not None:  # cfg.json holds a list
            object.__setattr__(self, "matryoshka_widths", tuple(self.matryoshka_widths))
        import sae_kit.sae  # noqa: F401  (registers every architecture)

        if self.architecture not in SparseCoder.REGISTRY:
            raise ValueError(f"unknown architecture {self.architecture!r}; valid: {sorted(SparseCoder.REGISTRY)}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"unknown normalize_activations {self.normalize_activations!r}; valid: {list(NORMALIZATIONS)}")
        if self.norm_scaling_factor is not None and not self.norm_scaling_factor > 0:
            raise ValueError(f"norm_scaling_factor must be > 0 (or None), got {self.norm_scaling_factor}")
        if self.hook_head_index is not None and self.hook_head_index < 0:
            raise ValueError(f"hook_head_index must be ≥ 0 (or None), got {self.hook_head_index}")
        SparseCoder.REGISTRY[self.architecture].validate_config(self)

    @property
    def d_target(self) -> int:
        """Width of the reconstruction target."""
        return self.d_out if self.d_out is not None else self.d_in

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form written to cfg.json."""
        return self._fields_then_knobs()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Rebuild from cfg.json, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SAE config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> SAEConfig:
        """A copy with some fields changed (configs are never mutated)."""
        return dataclasses.replace(self, **changes)


class EncoderOutput(NamedTuple):
    """Sparse form of the latents: the active values and which latents they belong to."""

    top_acts: Tensor  # (N, k) activation values (0 where fewer than k fired)
    top_indices: Tensor  # (N, k) latent indices, int64
    pre_acts: Tensor  # (N, d_sae) pre-activations, kept for AuxK / JumpReLU losses


class ForwardOutput(NamedTuple):
    """Everything one training or eval step needs from a forward pass."""

    sae_out: Tensor  # (N, d_out) reconstruction ŷ
    latent_acts: Tensor  # (N, k) sparse values, or (N, d_sae) dense for JumpReLU / ReLU
    latent_indices: Tensor | None  # (N, k) indices, or None when latent_acts is dense
    fvu: Tensor  # scalar: E‖y−ŷ‖² / E‖y−E[y]‖² over the batch
    auxk_loss: Tensor  # scalar, 0 when unused
    sparsity_loss: Tensor  # scalar, already multiplied by its coefficient; 0 when unused
    loss: Tensor  # scalar: what the optimiser minimises
    l0: Tensor  # scalar: mean active latents per row


class SparseCoder(nn.Module):
    """Base class: holds the parameters, save/load, decoder-norm maintenance and weight folding."""

    REGISTRY: ClassVar[dict[str, type[SparseCoder]]] = {}
    architecture: ClassVar[str] = ""

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg = cfg
        dtype = dtype or getattr(torch, cfg.dtype)
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_target
        # Unit-norm random decoder rows, encoder = decoder transpose (Gao et al.): good start for TopK.
        w_dec = torch.randn(d_sae, d_out, device=device, dtype=dtype)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)  # (d_sae, d_out)
        w_enc = w_dec.clone() if d_in == d_out else torch.randn(d_sae, d_in, device=device, dtype=dtype) / d_in**0.5
        # Shape (d_in, d_sae), stored latent-major (strides (1, d_in)): the sparse backward builds the gradient
        # one latent row at a time, and autograd would copy a gradient whose layout differs from the parameter's.
        # Matmuls take either layout at the same speed; the saved file is contiguous (d_in, d_sae) as before.
        self.W_enc = nn.Parameter(w_enc.T)  # (d_in, d_sae)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype))
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_out, device=device, dtype=dtype))  # (d_in, d_out)
        else:
            self.W_skip = None

    # -- registry ---------------------------------------------------------------------------------------
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.architecture:
            SparseCoder.REGISTRY[cls.architecture] = cls

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        """Raise ValueError naming the bad field; architectures extend this (and call it via super())."""
        if cfg.d_out is not None and cfg.d_out <= 0:
            raise ValueError(f"d_out must be positive (or None for d_in), got d_out={cfg.d_out}")
        if cfg.d_out is not None and cfg.d_out != cfg.d_in and not cfg.transcoder:
            raise ValueError(f"an SAE reconstructs its input, so d_out must be None or d_in={cfg.d_in}, got "
                             f"d_out={cfg.d_out}; set transcoder=True for a different target")
        if cfg.k_aux is not None and cfg.k_aux <= 0:
            raise ValueError(f"k_aux must be positive (or None for d_out // 2), got k_aux={cfg.k_aux}")
        if cfg.auxk_coefficient < 0 or cfg.sparsity_coefficient < 0:
            raise ValueError(f"loss coefficients must be ≥ 0, got auxk_coefficient={cfg.auxk_coefficient}, "
                             f"sparsity_coefficient={cfg.sparsity_coefficient}")

    @classmethod
    def from_config(cls, cfg: SAEConfig, **kwargs: Any) -> SparseCoder:
        """Build the registered architecture named by cfg.architecture."""
        import sae_kit.sae  # noqa: F401  (registers every architecture)

        if cfg.architecture not in SparseCoder.REGISTRY:
            raise ValueError(
                f"unknown architecture {cfg.architecture!r}; valid: {sorted(SparseCoder.REGISTRY)}"
            )
        return SparseCoder.REGISTRY[cfg.architecture](cfg, **kwargs)

    # -- the maths every architecture defines ---------------------------------------------------------------
    @property
    def d_sae(self) -> int:
        """Number of latents (cfg.d_sae)."""
        return self.cfg.d_sae

    @property
    def centres_input(self) -> bool:
        """True when the encoder reads x − b_dec (SAEs with apply_b_dec_to_input; never transcoders)."""
        return not self.cfg.transcoder and self.cfg.apply_b_dec_to_input

    def normalize_input(self, x: Tensor) -> Tensor:
        """x (N, d_in) after the config's input normalisation (identity for "none")."""
        mode = self.cfg.normalize_activations
        if mode == "expected_average_only_in":
            return x if self.cfg.norm_scaling_factor is None else x * self.cfg.norm_scaling_factor
        if mode == "constant_norm_rescale":
            return x * (self.cfg.d_in ** 0.5 / x.norm(dim=-1, keepdim=True))
        if mode == "layer_norm":
            xc = x - x.mean(dim=-1, keepdim=True)
            return xc / (xc.std(dim=-1, keepdim=True) + LAYER_NORM_EPS)
        return x

    def encoder_input(self, x: Tensor) -> Tensor:
        """Normalise, then centre SAE inputs by b_dec (Gao et al. b_pre); transcoders see x as it is."""
        x = self.normalize_input(x)
        return x - self.b_dec if self.centres_input else x

    def decoder_gain(self, x: Tensor | None = None) -> Tensor | float:
        """Factor (N, 1) or scalar by which the normalisation's inverse scales a change of z·W_dec in the output."""
        mode = self.cfg.normalize_activations
        if self.cfg.transcoder or mode == "none":
            return 1.0
        if mode == "expected_average_only_in":
            return 1.0 if self.cfg.norm_scaling_factor is None else 1.0 / self.cfg.norm_scaling_factor
        x = self._input_for_output(x)
        if mode == "constant_norm_rescale":
            return x.norm(dim=-1, keepdim=True) / self.cfg.d_in ** 0.5
        return (x - x.mean(dim=-1, keepdim=True)).std(dim=-1, keepdim=True)

    def _input_for_output(self, x: Tensor | None) -> Tensor:
        if x is None:
            raise ValueError(f"this SAE normalises each input row (normalize_activations="
                             f"{self.cfg.normalize_activations!r}); decode needs the input x to undo it")
        return x

    def _add_bias_and_skip(self, out: Tensor, x: Tensor | None) -> Tensor:
        """Decoder output (N, d_out) from z·W_dec: add b_dec, undo the input normalisation (SAEs; needs x when it is
        per row), add the skip path x W_skip (skip transcoders, which need x)."""
        out = out + self.b_dec
        mode = self.cfg.normalize_activations
        if mode != "none" and not self.cfg.transcoder:
            if mode == "expected_average_only_in":
                if self.cfg.norm_scaling_factor is not None:
                    out = out / self.cfg.norm_scaling_factor
            elif mode == "constant_norm_rescale":
                xi = self._input_for_output(x)
                out = out / (self.cfg.d_in ** 0.5 / xi.norm(dim=-1, keepdim=True))
            else:  # layer_norm
                xi = self._input_for_output(x)
                mu = xi.mean(dim=-1, keepdim=True)
                out = out * (xi - mu).std(dim=-1, keepdim=True) + mu
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a skip transcoder's decode needs the input x for its skip path")
            out = out + x @ self.W_skip
        return out

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations (N, d_sae)."""
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations (N, d_sae) for inputs (N, d_in)."""
        raise NotImplementedError

    def decode(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """Reconstruction (N, d_out) from dense latents; x is needed by skip transcoders and per-row normalisations."""
        return self._add_bias_and_skip(z @ self.W_dec, x)

    def encode_sparse(self, x: Tensor) -> EncoderOutput:
        """Active latents of inputs (N, d_in): values (N, K) and ascending indices (N, K), K the largest count of
        nonzero latents in a row (padded slots hold 0), plus pre-activations (N, d_sae). Generic form for
        dense-latent architectures; the TopK family overrides it."""
        z = self.encode(x)  # (N, d_sae)
        width = max(1, int((z != 0).sum(-1).max())) if z.numel() else 1
        idx = z.abs().topk(min(width, z.shape[-1]), dim=-1).indices.sort(dim=-1).values  # (N, K) ascending
        return EncoderOutput(z.gather(-1, idx), idx, self.pre_acts(x))

    def decode_sparse(self, values: Tensor, indices: Tensor, x: Tensor | None = None) -> Tensor:
        """ŷ (N, d_out) from sparse latents (values, indices (N, K)) without building the dense (N, d_sae) code."""
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")
        return self._add_bias_and_skip(out, x)

    def forward(self, x: Tensor, target: Tensor | None = None, **loss_kwargs: Any) -> ForwardOutput:
        """Encode, decode and compute the training loss; target defaults to x (an SAE)."""
        raise NotImplementedError

    def reconstruction_target(self, x: Tensor, target: Tensor | None) -> Tensor:
        """What forward's loss compares ŷ with: target, else x for an SAE; ValueError for a transcoder given none
        (defaulting to x would train it, without a word, to reconstruct its input)."""
        if target is not None:
            return target
        if self.cfg.transcoder:
            raise ValueError(f"a transcoder predicts {self.cfg.target_hook_point or 'its target'!r} from its input "
                             f"{self.cfg.hook_point or 'x'!r}: pass those target activations as forward(x, target=y)")
        return x

    def _dense_output(self, x: Tensor, target: Tensor | None, z: Tensor, sparsity: Tensor,
                      l0: Tensor) -> ForwardOutput:
        """Output of a dense-latent coder: decode z (N, d_sae); loss = FVU + the λ-weighted sparsity term."""
        y_hat = self.decode(z, x)  # (N, d_out)
        recon_fvu = fvu(self.reconstruction_target(x, target), y_hat)
        zero = recon_fvu.new_zeros(())
        return ForwardOutput(y_hat, z, None, recon_fvu, zero, sparsity, recon_fvu + sparsity, l0)

    def _sparsity_coefficient(self, override: float | None) -> float:
        """λ for this forward: the trainer's warmed-up value, else the config's."""
        return self.cfg.sparsity_coefficient if override is None else override

    # -- maintenance called by the trainer ---------------------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm_(self, skip: Tensor | None = None) -> None:
        """Renormalise every decoder row to unit L2 norm (unless `skip`, a 0-d bool on the device, is set)."""
        if kernels.triton_rows_usable(self.W_dec):  # one read and one write of W_dec, the flag read on the device
            flag = skip if skip is not None else torch.zeros((), dtype=torch.bool, device=self.W_dec.device)
            kernels.triton_kernels.unit_rows_(self.W_dec.data, flag, torch.finfo(self.W_dec.dtype).eps)
            return
        norm = self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)  # (d_sae, 1)
        if skip is not None:
            norm.masked_fill_(skip, 1.0)  # dividing by 1 leaves the rows bit-identical
        self.W_dec.data /= norm

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions_(self) -> None:
        """Project out the gradient component along each decoder row, so Adam cannot grow the norm."""
        if self.W_dec.grad is None:
            return
        w, g = self.W_dec.data, self.W_dec.grad  # (d_sae, d_out) each
        if kernels.triton_rows_usable(w) and g.stride() == w.stride():  # one read of each, one write of g
            kernels.triton_kernels.project_out_rows_(g, w)
            return
        # g −= (⟨g, w⟩ / ‖w‖²)·w, in passes that each read W_dec and its gradient once: the row dot products as a
        # batched (1 × d) · (d × 1) product and the update as one addcmul, with no (d_sae, d_out) temporaries
        # (at 131072 × 4096 every temporary is 2 GB of memory traffic).
        sq_norm = torch.linalg.vector_norm(w, dim=1).square_().clamp_min_(1e-24)  # (d_sae,)
        dot = torch.bmm(g.unsqueeze(1), w.unsqueeze(2)).view(-1)  # (d_sae,)
        g.addcmul_(w, (dot / sq_norm).unsqueeze(1), value=-1.0)

    # -- training hooks (the trainer calls them for every architecture; most need nothing) -----------------------
    has_k: ClassVar[bool] = False
    """True when the config's k (active latents per token) applies: the TopK family, trained with AuxK."""
    calibrates_after_training: ClassVar[bool] = False
    """True when `calibrate_` sets inference-only state from data, so the trainer reads a sample for it."""
    unit_norm_decoder: ClassVar[bool] = False
    """True when the trainer keeps decoder rows at unit norm (projecting the gradient, renormalising after Adam)."""
    uses_sparsity_coefficient: ClassVar[bool] = False
    """True when the loss has a λ-weighted sparsity term (the trainer warms λ up and logs it)."""
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    """Adam's (β1, β2) for this architecture."""

    follows_training_precision: ClassVar[bool] = True
    """Whether `training_precision` changes this architecture's encoder product (False: it always runs in the
    parameters' dtype, and the saved metadata says so)."""

    def training_precision(self, dtype: torch.dtype | None) -> AbstractContextManager:
        """Context for a training forward whose encoder product runs on `dtype` operands (None: the parameters'
        dtype). Dense coders autocast; the TopK family casts its own encoder product (autocast cannot reach it)."""
        if dtype is None or dtype == self.W_enc.dtype:
            return nullcontext()
        return torch.autocast(self.W_enc.device.type, dtype=dtype)

    def init_from_data_(self, x: Tensor) -> None:
        """Architecture-specific start from a sample (N, d_in) of scaled training inputs, after b_dec is set."""

    def calibrate_(self, x: Tensor) -> dict[str, Any]:
        """After training, fit inference-only state to raw rows x (N, d_in); return what to record in metadata."""
        return {}

    @torch.no_grad()
    def fold_scaling_(self, input_scale: float, output_scale: float | None = None) -> None:
        """Absorb training-time scaling (x·input_scale, y·output_scale) so the coder takes raw activations.

        Latent activations are unchanged by the fold: the encoder sees (x·s_in − b_dec)W = (x − b_dec/s_in)(s_in·W).
        """
        s_in = float(input_scale)
        s_out = float(output_scale) if output_scale is not None else s_in
        self.W_enc.data *= s_in
        self.W_dec.data /= s_out
        self.b_dec.data /= s_out
        if self.W_skip is not None:
            self.W_skip.data *= s_in / s_out

    # -- persistence ---------------------------------------------------------------------------------------
    def inference_state_dict(self) -> dict[str, Tensor]:
        """Tensors written to sae_weights.safetensors, under conventional names; architectures may rename.

        The plain `state_dict()` (used by training checkpoints, exact to the bit) is left alone.
        """
        return {name: t.detach() for name, t in self.state_dict().items()}

    def load_inference_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of `inference_state_dict`: load the saved tensors strictly."""
        self.load_state_dict(state, strict=True)

    def save(self, path: str | Path, format: str = "sae-kit") -> None:
        """Write the coder into the folder `path`: "sae-kit" (cfg.json + sae_weights.safetensors, atomically, file by
        file), "saelens" or "sparsify" (their own layouts; see `sae_kit.formats`)."""
        from sae_kit.formats import save

        save(self, path, format=format)

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu", subfolder: str | None = None,
             **options: Any) -> SparseCoder:
        """Load a sparse coder from a local folder of any supported format, a hub repo id ("org/repo", with
        `subfolder`), or "release:sae_id" from the shipped registry; options go to the format reader (`dtype`,
        `trust_remote_pickle`, `revision`, ...)."""
        from sae_kit.formats import load

        return load(path, device=device, subfolder=subfolder, **options)

    @staticmethod
    def from_pretrained(release: str, sae_id: str, device: str | torch.device = "cpu", **options: Any) -> SparseCoder:
        """Load `sae_id` of a released set listed in sae_kit/pretrained_saes.yaml (hub repo, layout and format)."""
        from sae_kit.registry import from_pretrained

        return from_pretrained(release, sae_id, device=device, **options)

    def push_to_hub(self, repo_id: str, **options: Any) -> str:
        """Upload the coder (and a generated model card) to a Hugging Face hub repo; returns the commit URL."""
        from sae_kit.hub import push_to_hub

        return push_to_hub(self, repo_id, **options)


def fvu(target: Tensor, recon: Tensor) -> Tensor:
    """Fraction of variance unexplained: E‖y−ŷ‖² / E‖y−E[y]‖² (per-dimension mean, not the mean of squares)."""
    if target.requires_grad:  # the fused form treats the target as data
        total = (target - target.mean(dim=0, keepdim=True)).pow(2).sum()
        return (target - recon).pow(2).sum() / total.clamp_min(torch.finfo(target.dtype).tiny)
    return _FVU.apply(target, recon)


class _FVU(torch.autograd.Function):
    """FVU with the gradient w.r.t. the reconstruction only: 5 passes over (N, d) instead of ~10, each a
    subtraction or a dot product (`pow` and `var(dim=0)` are several times slower on CPU)."""

    @staticmethod
    def forward(ctx: Any, target: Tensor, recon: Tensor) -> Tensor:
        err = (target - recon).reshape(-1)  # (N·d,)
        centred = (target - target.mean(dim=0, keepdim=True)).reshape(-1)
        total = torch.dot(centred, centred).clamp_min(torch.finfo(target.dtype).tiny)
        ctx.save_for_backward(err, total)
        ctx.shape = recon.shape
        return torch.dot(err, err) / total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        err, total = ctx.saved_tensors
        return None, (err * (-2 * grad / total)).view(ctx.shape)
