"""Shared base for every sparse coder: SAEs and (skip) transcoders.

A sparse coder maps an input x ∈ R^{d_in} to latents z ∈ R^{d_sae} and reconstructs a target
y ∈ R^{d_out} (y = x for an SAE; the MLP output for a transcoder):

    z  = act(W_encᵀ(x − b_dec·[SAE]) + b_enc)
    ŷ  = W_decᵀ z + b_dec (+ W_skipᵀ x for a skip transcoder)

Parameters keep the field's conventional names and shapes so other toolkits' files map onto them:
`W_enc` [d_in, d_sae], `W_dec` [d_sae, d_out], `b_enc` [d_sae], `b_dec` [d_out], `W_skip` [d_in, d_out],
`threshold` [d_sae] (JumpReLU) or [] (BatchTopK's single inference threshold).

Each architecture is one file subclassing `SparseCoder`, registered by setting its `architecture` class attribute.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"


@dataclass(frozen=True)
class SAEConfig:
    """Everything needed to rebuild a sparse coder; serialised as `cfg.json`."""

    architecture: str
    """Registry name: "topk", "batchtopk", "jumprelu", "abstopk" or "relu"."""
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
    # Architecture-specific knobs; unused ones are ignored by the other architectures.
    k_aux: int | None = None
    """Dead latents used by the AuxK loss; None means d_in // 2."""
    auxk_coefficient: float = 1 / 32
    """Weight of the AuxK loss (Gao et al.)."""
    jumprelu_bandwidth: float = 0.001
    """Rectangle-kernel bandwidth ε of the JumpReLU straight-through estimator."""
    jumprelu_init_threshold: float = 0.001
    """Initial θ of every JumpReLU latent."""
    sparsity_coefficient: float = 0.0
    """Final λ of the L0 (JumpReLU) or decoder-norm-weighted L1 (ReLU) penalty."""
    target_l0: float | None = None
    """JumpReLU: if set, penalise (L0/target_l0 − 1)² instead of plain λ·L0."""
    input_scale: float = 1.0
    """Scale the saved weights already absorb: 1.0 after folding; kept for provenance."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form training provenance (tokens seen, normalisation, dataset, metrics)."""

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        import sae_kit.sae  # noqa: F401  (registers every architecture)

        if self.architecture not in SparseCoder.REGISTRY:
            raise ValueError(f"unknown architecture {self.architecture!r}; valid: {sorted(SparseCoder.REGISTRY)}")
        SparseCoder.REGISTRY[self.architecture].validate_config(self)

    @property
    def d_target(self) -> int:
        """Width of the reconstruction target."""
        return self.d_out if self.d_out is not None else self.d_in

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form written to cfg.json."""
        return dataclasses.asdict(self)

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
            raise ValueError(f"k_aux must be positive (or None for d_in // 2), got k_aux={cfg.k_aux}")
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
        return self.cfg.d_sae

    def encoder_input(self, x: Tensor) -> Tensor:
        """Centre SAE inputs by b_dec (Gao et al. b_pre); transcoders see x as it is."""
        return x if self.cfg.transcoder else x - self.b_dec

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations (N, d_sae)."""
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations (N, d_sae) for inputs (N, d_in)."""
        raise NotImplementedError

    def decode(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """Reconstruction (N, d_out) from dense latents; x is needed only by skip transcoders."""
        out = z @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a skip transcoder's decode needs the input x for its skip path")
            out = out + x @ self.W_skip
        return out

    def forward(self, x: Tensor, target: Tensor | None = None, **loss_kwargs: Any) -> ForwardOutput:
        """Encode, decode and compute the training loss; target defaults to x (an SAE)."""
        raise NotImplementedError

    def _dense_output(self, x: Tensor, target: Tensor | None, z: Tensor, sparsity: Tensor,
                      l0: Tensor) -> ForwardOutput:
        """Output of a dense-latent coder: decode z (N, d_sae); loss = FVU + the λ-weighted sparsity term."""
        y_hat = self.decode(z, x)  # (N, d_out)
        recon_fvu = fvu(x if target is None else target, y_hat)
        zero = recon_fvu.new_zeros(())
        return ForwardOutput(y_hat, z, None, recon_fvu, zero, sparsity, recon_fvu + sparsity, l0)

    def _sparsity_coefficient(self, override: float | None) -> float:
        """λ for this forward: the trainer's warmed-up value, else the config's."""
        return self.cfg.sparsity_coefficient if override is None else override

    # -- maintenance called by the trainer ---------------------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm_(self) -> None:
        """Renormalise every decoder row to unit L2 norm."""
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions_(self) -> None:
        """Project out the gradient component along each decoder row, so Adam cannot grow the norm."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec.data / self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-12)
        parallel = (self.W_dec.grad * w).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * w

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

    def save(self, path: str | Path) -> None:
        """Write `cfg.json` and `sae_weights.safetensors` into the folder `path` (atomically, file by file)."""
        from sae_kit.io import save_sparse_coder

        save_sparse_coder(self, path)

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu") -> SparseCoder:
        """Rebuild the right architecture from a folder holding cfg.json + sae_weights.safetensors."""
        from sae_kit.io import load_sparse_coder

        return load_sparse_coder(path, device=device)


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
