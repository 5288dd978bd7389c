"""TopK SAE (Gao et al., "Scaling and evaluating sparse autoencoders").

    pre = W_encᵀ(x − b_dec) + b_enc            (transcoders: x is not centred)
    z   = ReLU(TopK_k(pre))                    keep the k largest pre-activations per row
    ŷ   = W_decᵀ z + b_dec (+ W_skipᵀ x)

Training loss (what `forward(...).loss` holds):

    loss = FVU(y, ŷ) + auxk_coefficient · AuxK
    FVU  = Σ‖y − ŷ‖² / Σ‖y − ȳ‖²                                            (over the batch)
    AuxK = min(1, n_dead / k_aux) · Σ‖e − ê‖² / Σ‖e − ē‖²,   e = (y − ŷ) detached

where ê = W_decᵀ ReLU(TopK_{k_aux}(pre restricted to the dead latents)) (no bias), k_aux = cfg.k_aux or d_out // 2,
and dead latents come from the trainer as `dead_mask`. AuxK is normalised by the residual's own variance (Gao et
al.'s NMSE of e; sparsify divides by the variance of y instead) and scaled down like sparsify when fewer than
k_aux latents are dead. `sparsity_loss` is 0.

By default training runs the fast path of `kernels.py` (row-chunked encoder, or the exact bf16-product selection
on CPUs with bf16 matrix units; sparse decoder, sparse backward);
`use_sparse_kernels = False` switches to the plain dense reference with autograd everywhere.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_kit.sae import kernels
from sae_kit.sae.base import EncoderOutput, ForwardOutput, SAEConfig, SparseCoder, fvu
from sae_kit.sae.kernels import (
    SparsePattern,
    bf16_preselect_usable,
    bf16_rescored_topk,
    bf16_topk,
    gather_pre_acts,
    scratch,
    sparse_decode,
    sparse_pattern,
    topk_biased,
    topk_indices,
)

CHUNK_ELEMENTS = 1 << 23
"""Pre-activations computed per encoder chunk on CPU (32 MB in fp32; 1024 rows of a 8192-wide SAE): the top-k reads
each chunk while it is still warm in cache (≈5% faster per step than one 4096-row chunk on a 2-core CPU), the chunk
is still tall enough for the encoder matmul to run at full speed, and memory stays bounded for wide SAEs."""
CUDA_CHUNK_ELEMENTS = 1 << 28
"""The same on CUDA (512 MB in bf16; 2048 rows of a 131072-wide SAE): GPU matmuls need tall operands to fill the
device, and memory stays far below a dense (N, d_sae) forward with its autograd copies."""


BF16_MAX_WIDTH_FRACTION = 1 / 32
"""The bf16 preselection runs when at most this fraction of the latents is selected per row."""


class Selection(NamedTuple):
    """Which latents are active, chosen without autograd; values are the pre-activations there."""

    values: Tensor  # (N, K) pre-activations at the active slots
    indices: Tensor  # (N, K) latent indices, ascending within each row
    keep: Tensor | None  # (N, K) 1.0 for slots really active, 0.0 for padding (BatchTopK); None: all active
    aux_values: Tensor | None  # (N, k_aux) pre-activations of the AuxK dead latents, or None
    aux_indices: Tensor | None  # (N, k_aux) their latent indices


class TopKSAE(SparseCoder):
    """Keep the k largest pre-activations per row (ReLU on the kept values)."""

    architecture = "topk"
    has_k = True
    unit_norm_decoder = True
    by_magnitude: ClassVar[bool] = False
    """Rank latents by |pre| instead of pre (AbsTopK)."""

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        super().__init__(cfg, device=device, dtype=dtype)
        self.use_sparse_kernels = True
        """Train through kernels.py; False runs the dense reference (same numbers, ~5× slower)."""
        self.encoder_dtype: torch.dtype | None = None
        """Operand dtype of the training encoder product (set by `training_precision`); None: the parameters'."""

    @contextmanager
    def training_precision(self, dtype: torch.dtype | None) -> Iterator[None]:
        """Select from pre-activations computed on `dtype` operands (bf16: the tensor cores) for this forward."""
        previous, self.encoder_dtype = self.encoder_dtype, (None if dtype == self.W_enc.dtype else dtype)
        try:
            yield
        finally:
            self.encoder_dtype = previous

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        """k must be set and lie in [1, d_sae)."""
        super().validate_config(cfg)
        if cfg.k is None:
            raise ValueError(f"{cfg.architecture} needs k (active latents per token), valid 1 ≤ k < d_sae={cfg.d_sae}")
        if not 0 < cfg.k < cfg.d_sae:
            raise ValueError(f"{cfg.architecture} needs 1 ≤ k < d_sae={cfg.d_sae}, got k={cfg.k}")

    # -- selection and activation (AbsTopK / BatchTopK override) ---------------------------------------------
    def activation(self, values: Tensor) -> Tensor:
        """Activation applied to the selected pre-activations."""
        return F.relu(values)

    def select(self, pre: Tensor, k: int) -> Tensor:
        """Indices (N, k) of the latents kept per row, ascending within each row."""
        return topk_indices(pre, k, by_magnitude=self.by_magnitude)

    def active_latents(self, pre: Tensor, train: bool) -> tuple[Tensor, Tensor | None]:
        """Active indices (N, K) ascending per row, and the keep mask (None: all K slots active)."""
        return self.select(pre, self.cfg.k), None

    def select_from_pre(self, pre: Tensor, dead: Tensor | None, train: bool = False) -> Selection:
        """Active latents (and AuxK dead latents) of a block of rows, from its pre-activations (N, d_sae)."""
        idx, keep = self.active_latents(pre, train)  # (N, K)
        aux_values, aux_idx = self._aux_selection(pre.index_select(1, dead) if dead is not None else None, dead)
        return Selection(pre.gather(1, idx), idx, keep, aux_values, aux_idx)

    def _aux_selection(self, dead_pre: Tensor | None, dead: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The AuxK slots: the k_aux best of the dead latents' pre-activations dead_pre (N, n_dead), or Nones."""
        if dead_pre is None or dead is None:
            return None, None
        pos = self.select(dead_pre, self._k_aux(dead.numel()))  # (N, k_aux), ascending
        return dead_pre.gather(1, pos), dead[pos]  # dead is ascending, so the indices are too

    def select_active(self, x: Tensor, dead: Tensor | None, train: bool = False) -> Selection:
        """Selection for inputs (N, d_in): the per-row top k (no autograd; BatchTopK overrides this)."""
        return self.row_topk(self.encoder_input(x), dead, self.cfg.k)

    def row_topk(self, xc: Tensor, dead: Tensor | None, width: int) -> Selection:
        """The `width` best latents of each row of encoder inputs xc (N, d_in) with their pre-activations (values,
        ascending indices), and the AuxK slots; no autograd, a chunk of rows at a time.

        With AMX, through the exact bf16 preselection (`kernels.bf16_topk`); on CUDA, opted in, through its torch
        counterpart (`kernels.bf16_rescored_topk`). Otherwise the chunk's matmul skips b_enc and the top-k adds it
        while reading the chunk, which saves a full pass over it.
        """
        narrow = BF16_MAX_WIDTH_FRACTION * self.cfg.d_sae >= width
        if self.encoder_dtype is not None or xc.is_cuda:
            if self.encoder_dtype is None and narrow and bf16_preselect_usable(xc, self.W_enc):
                return self._row_topk_rescored(xc, dead, width)
            return self._row_topk_device(xc, dead, width)
        b_enc = self.b_enc.detach()
        step = max(1, CHUNK_ELEMENTS // self.cfg.d_sae)
        # The bf16 bound leaves ~1.7·width candidates per row to recompute; past ~1/32 of the latents (BatchTopK's
        # widened candidate lists on narrow SAEs) the fp32 product is faster.
        if narrow and bf16_preselect_usable(xc, self.W_enc):
            got = bf16_topk(xc, self.W_enc, b_enc, width, step, self.by_magnitude)
            if got is not None:  # None: a non-finite row; the fp32 path below handles it
                return Selection(*got, None, *self._aux_selection(self._dead_pre_acts(xc, dead), dead))
        parts = []
        for i in range(0, xc.shape[0], step):
            rows = xc[i:i + step]  # (C, d_in)
            pre = scratch((rows.shape[0], self.cfg.d_sae), self.W_enc.dtype, self.W_enc.device)  # (C, d_sae)
            torch.mm(rows, self.W_enc, out=pre)  # no b_enc yet
            # AuxK reads the dead columns first: topk_biased may reuse pre.
            dead_pre = pre.index_select(1, dead) + b_enc[dead] if dead is not None else None
            aux_values, aux_idx = self._aux_selection(dead_pre, dead)
            values, idx = topk_biased(pre, b_enc, width, self.by_magnitude)
            parts.append(Selection(values, idx, None, aux_values, aux_idx))
        if len(parts) == 1:
            return parts[0]
        return Selection(*(None if fields[0] is None else torch.cat(fields) for fields in zip(*parts)))

    def _row_topk_rescored(self, xc: Tensor, dead: Tensor | None, width: int) -> Selection:
        """`row_topk` in fp32 through a bf16 product on any device (`kernels.bf16_rescored_topk`): the exact
        selection and fp32 values; the AuxK slots from an fp32 product over the dead latents' columns alone."""
        step = max(1, (CUDA_CHUNK_ELEMENTS if xc.is_cuda else CHUNK_ELEMENTS) // self.cfg.d_sae)
        values, idx = bf16_rescored_topk(xc, self.W_enc, self.b_enc, width, step, self.by_magnitude)
        return Selection(values, idx, None, *self._aux_selection(self._dead_pre_acts(xc, dead), dead))

    def _dead_pre_acts(self, xc: Tensor, dead: Tensor | None) -> Tensor | None:
        """fp32 pre-activations (N, n_dead) of the dead latents alone, for the paths whose product is bf16."""
        if dead is None:
            return None
        return torch.addmm(self.b_enc.detach()[dead], xc, self.W_enc.detach()[:, dead])

    def _row_topk_device(self, xc: Tensor, dead: Tensor | None, width: int) -> Selection:
        """`row_topk` from plain torch ops: on CUDA, and wherever the encoder runs in a lower precision.

        With `encoder_dtype` bf16 the product runs on bf16 operands with fp32 accumulation (tensor cores) and the
        rows' top `width` are read off the bf16 pre-activations, as sparsify does under autocast: the values are
        bf16-rounded (relative error ≤ 2⁻⁸) and near-ties may swap. Gradients are computed in fp32 all the same.
        """
        dtype = self.encoder_dtype or self.W_enc.dtype
        W = self.W_enc.detach().to(dtype)  # (d_in, d_sae): one cast per forward, shared by the chunks
        b_enc = self.b_enc.detach().to(dtype)
        step = max(1, (CUDA_CHUNK_ELEMENTS if xc.is_cuda else CHUNK_ELEMENTS) // self.cfg.d_sae)
        parts = []
        for i in range(0, xc.shape[0], step):
            pre = torch.addmm(b_enc, xc[i:i + step].to(dtype), W)  # (C, d_sae)
            dead_pre = pre.index_select(1, dead).to(self.W_enc.dtype) if dead is not None else None
            key = pre.abs() if self.by_magnitude else pre
            if kernels.GROUPED_TOPK_CUDA and key.is_cuda:  # the module's flag: the bench toggles it
                idx = topk_indices(key, width)  # (C, width) ascending
            else:
                idx = key.topk(width, dim=1, sorted=False).indices.sort(dim=1).values  # (C, width) ascending
            parts.append(Selection(pre.gather(1, idx).to(self.W_enc.dtype), idx, None,
                                   *self._aux_selection(dead_pre, dead)))
        if len(parts) == 1:
            return parts[0]
        return Selection(*(None if fields[0] is None else torch.cat(fields) for fields in zip(*parts)))

    def _k_aux_full(self) -> int:
        """k_aux with every latent dead: cfg.k_aux, else half the width of the residual AuxK predicts (d_out // 2,
        = d_in // 2 for an SAE), as sparsify does and Gao et al.'s d_model / 2 for an SAE."""
        return self.cfg.k_aux or max(1, self.cfg.d_target // 2)

    def _k_aux(self, n_dead: int) -> int:
        return min(self._k_aux_full(), n_dead)

    # -- inference --------------------------------------------------------------------------------------------
    def encode_sparse(self, x: Tensor) -> EncoderOutput:
        """Sparse latents: the active values (N, K) and their indices, plus the pre-activations (N, d_sae)."""
        pre = self.pre_acts(x)  # (N, d_sae)
        sel = self.select_from_pre(pre.detach(), None)
        acts = self.activation(pre.gather(1, sel.indices))
        if sel.keep is not None:
            acts = acts * sel.keep
        return EncoderOutput(acts, sel.indices, pre)

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents (N, d_sae), zero outside the active set."""
        enc = self.encode_sparse(x)
        return torch.zeros_like(enc.pre_acts).scatter_(-1, enc.top_indices, enc.top_acts)


    # -- training ---------------------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, target: Tensor | None = None, dead_mask: Tensor | None = None,
        sparsity_coefficient: float | None = None, dead_latents: Tensor | None = None, **_: Any,
    ) -> ForwardOutput:
        """Encode, decode, FVU + AuxK (see the module docstring); sparsity_coefficient is unused. The dead latents
        come as a mask, or as their ascending indices (`dead_latents`, which the trainer keeps: listing a mask's
        entries waits for the device)."""
        y = self.reconstruction_target(x, target)
        dead = self._dead_latents(dead_mask, dead_latents)
        if self.sparse_path_usable():
            acts, idx, y_hat, e_hat, parts = self._forward_sparse(x, dead)
        else:
            acts, idx, y_hat, e_hat, parts = self._forward_dense(x, dead)
        recon_fvu = fvu(y, y_hat)
        auxk = self._auxk_loss(y, y_hat, e_hat, dead)
        l0 = (acts != 0).sum(-1, dtype=torch.float32).mean()
        loss = self.reconstruction_loss(x, y, acts, idx, parts, recon_fvu)
        if e_hat is not None and dead is not None:  # else AuxK is the constant 0: two launches fewer per GPU step
            loss = loss + self.cfg.auxk_coefficient * auxk
        return ForwardOutput(y_hat, acts, idx, recon_fvu, auxk, recon_fvu.new_zeros(()), loss, l0)

    def sparse_path_usable(self) -> bool:
        """Whether a training forward may take the fast path of `kernels.py`, which reads raw x, so a coder that
        normalises its inputs (an imported one) takes the dense reference; so do fp16 / bf16 parameters on a CPU,
        whose sparse backward (`sparse_sampled_addmm`) takes fp32 and fp64 alone."""
        half_on_host = self.W_dec.device.type == "cpu" and self.W_dec.dtype in (torch.float16, torch.bfloat16)
        return self.use_sparse_kernels and self.cfg.normalize_activations == "none" and not half_on_host

    def _auxk_loss(self, y: Tensor, y_hat: Tensor, e_hat: Tensor | None, dead: Tensor | None) -> Tensor:
        """AuxK (module docstring): the dead latents' prediction e_hat of the residual, scaled down when fewer than
        k_aux latents are dead; 0 without one."""
        if e_hat is None or dead is None:
            return y_hat.new_zeros(())
        scale = min(1.0, dead.numel() / self._k_aux_full())
        return scale * fvu((y - y_hat).detach(), e_hat)

    def reconstruction_loss(self, x: Tensor, y: Tensor, acts: Tensor, idx: Tensor, parts: Tensor | None,
                            recon_fvu: Tensor) -> Tensor:
        """The reconstruction term of the loss: the FVU of ŷ. `parts` is what `_sparse_reconstruction` returned
        beside ŷ (None on the dense path); Matryoshka adds its nested prefixes from it."""
        return recon_fvu

    def _sparse_reconstruction(self, acts: Tensor, p: SparsePattern, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """ŷ (N, d_out) from the active slots through the sparse decoder, and nothing else for the loss."""
        return self._add_bias_and_skip(sparse_decode(acts, self.W_dec, p), x), None

    def _dead_latents(self, dead_mask: Tensor | None, dead_latents: Tensor | None = None) -> Tensor | None:
        """Ascending indices of the dead latents, or None when there are none: `dead_latents` as given (the trainer
        keeps them; listing a mask's entries waits for the device), else those of `dead_mask`."""
        if dead_latents is not None:
            return dead_latents if dead_latents.numel() else None
        if dead_mask is None:
            return None
        if dead_mask.shape != (self.cfg.d_sae,) or dead_mask.dtype != torch.bool:
            raise ValueError(f"dead_mask must be a bool tensor of shape ({self.cfg.d_sae},), got "
                             f"{dead_mask.dtype} {tuple(dead_mask.shape)}")
        dead = dead_mask.nonzero().squeeze(1)  # (n_dead,) ascending
        return dead if dead.numel() else None

    def _forward_sparse(self, x: Tensor, dead: Tensor | None):
        """Fast path: dense encoder matmul only; gather, decode and backward touch the active slots alone."""
        with torch.no_grad():
            sel = self.select_active(x, dead, train=self.training)
        return self._decode_sparse_selection(x, sel)

    def _decode_sparse_selection(self, x: Tensor, sel: Selection):
        """Activations, ŷ and the AuxK prediction of a selection, through the sparse kernels."""
        b_dec = self.b_dec if self.centres_input else None
        p = sparse_pattern(sel.indices, self.cfg.d_sae)
        acts = self.activation(gather_pre_acts(sel.values, x, self.W_enc, self.b_enc, b_dec, p))  # (N, K)
        if sel.keep is not None:
            acts = acts * sel.keep
        y_hat, parts = self._sparse_reconstruction(acts, p, x)  # (N, d_out)
        e_hat = None
        if sel.aux_indices is not None:
            pa = sparse_pattern(sel.aux_indices, self.cfg.d_sae)
            aux = self.activation(gather_pre_acts(sel.aux_values, x, self.W_enc, self.b_enc, b_dec, pa))
            e_hat = sparse_decode(aux, self.W_dec, pa)  # (N, d_out), no bias: it predicts a residual
        return acts, sel.indices, y_hat, e_hat, parts

    def _forward_dense(self, x: Tensor, dead: Tensor | None):
        """Reference path: dense pre-activations and dense latents, autograd everywhere."""
        pre = self.pre_acts(x)  # (N, d_sae)
        return self._decode_dense_selection(x, pre, self.select_from_pre(pre.detach(), dead, train=self.training))

    def _decode_dense_selection(self, x: Tensor, pre: Tensor, sel: Selection):
        """Activations, ŷ and the AuxK prediction of a selection from differentiable pre-activations (N, d_sae)."""
        acts = self.activation(pre.gather(1, sel.indices))  # (N, K)
        if sel.keep is not None:
            acts = acts * sel.keep
        z = torch.zeros_like(pre).scatter(1, sel.indices, acts)  # (N, d_sae)
        y_hat = self.decode(z, x)  # (N, d_out)
        e_hat = None
        if sel.aux_indices is not None:
            z_aux = torch.zeros_like(pre).scatter(1, sel.aux_indices, self.activation(pre.gather(1, sel.aux_indices)))
            # The residual is in the output's units: an imported SAE's normalisation scales the dead latents' part too.
            e_hat = z_aux @ self.W_dec  # (N, d_out)
            gain = self.decoder_gain(x)
            if not (isinstance(gain, float) and gain == 1.0):  # an SAE we train: no extra pass over (N, d_out)
                e_hat = e_hat * gain
        return acts, sel.indices, y_hat, e_hat, None
