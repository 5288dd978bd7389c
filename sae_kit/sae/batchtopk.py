"""BatchTopK SAE (Bussmann, Leask & Nanda, 2024, "BatchTopK Sparse Autoencoders").

Training (module in train mode, `forward`): keep the B·k largest ReLU'd pre-activations of the whole batch, so
rows get a variable number of latents that averages k:

    pre = W_encᵀ(x − b_dec) + b_enc,   z = ReLU(pre) ⊙ 1[ReLU(pre) among the top B·k of the batch]

Each training forward also updates the inference threshold θ (buffer `threshold`, one scalar) as an exponential
moving average (decay `threshold_decay`) of the smallest positive activation kept in the batch; the first update
sets it outright. Inference (`encode`, `encode_sparse`, and `forward` in eval mode) is batch-independent:

    z = ReLU(pre) ⊙ 1[pre > θ]

(before any θ has been estimated, θ < 0, inference falls back to a per-row TopK with k). At the end of training
the trainer replaces the EMA by `calibrate_threshold_` on a sample of rows: the exact cut of the final weights. Loss, AuxK and the fast
path are the TopK SAE's: loss = FVU + auxk_coefficient · AuxK. `latent_acts` are (N, K) with K the largest row
count of the batch; padded slots hold 0.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from sae_kit.sae.base import ForwardOutput, SAEConfig
from sae_kit.sae.kernels import scratch, topk_indices
from sae_kit.sae.topk import Selection, TopKSAE


class BatchTopKSAE(TopKSAE):
    """Top B·k over the batch while training; a learned global threshold at inference."""

    architecture = "batchtopk"
    threshold_decay: ClassVar[float] = 0.99
    """EMA decay of the inference threshold per training step."""

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        super().__init__(cfg, device=device, dtype=dtype)
        self.register_buffer("threshold", torch.tensor(-1.0, device=device, dtype=self.W_enc.dtype))  # () θ
        self._candidate_width = 0  # per-row candidates the training selection starts from (0: 4k)

    def active_latents(self, pre: Tensor, train: bool) -> tuple[Tensor, Tensor | None]:
        """Batch top-k when training, θ at inference (per-row TopK until θ is estimated)."""
        if train:
            return self._batch_topk(pre)
        if float(self.threshold) <= 0:
            return super().active_latents(pre, train)
        active = pre > self.threshold  # (N, d_sae)
        width = max(1, int(active.sum(1).max()))
        idx = topk_indices(pre, width)  # (N, K) ascending
        return idx, active.gather(1, idx).to(pre.dtype)

    def _batch_topk(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """The B·k largest positive pre-activations of the batch, as per-row padded (indices, keep mask), ranked
        from `pre.topk` (the dense reference of `select_active`)."""
        sel, slots, keep = self._widened_cut(lambda width: Selection(*pre.topk(width, dim=1), None, None, None))
        idx = sel.indices.gather(1, slots)  # (N, K) in the candidates' order (by value)
        order = idx.argsort(dim=1)  # ascending latents per row, as the sparse kernels want
        return idx.gather(1, order), keep.gather(1, order)

    calibrates_after_training: ClassVar[bool] = True

    def calibrate_(self, x: Tensor) -> dict[str, Any]:
        """Replace the training EMA of θ by the exact cut on x; record both."""
        ema = float(self.threshold)
        self.eval()
        theta = self.calibrate_threshold_(x)
        return {"batchtopk_threshold": {"ema_threshold": ema, "threshold": theta, "threshold_calibration_rows": len(x)}}

    @torch.no_grad()
    def calibrate_threshold_(self, x: Tensor, chunk_rows: int = 1024) -> float:
        """Set θ to the (N·k)-th largest positive pre-activation over the rows x (N, d_in), so inference keeps k
        latents per row on average on data like x; return θ. The training EMA lags θ behind the falling batch cut
        (by ~1/(1 − decay) steps), which at inference can cost most of the L0."""
        n = x.shape[0]
        width = min(self.cfg.d_sae, 4 * self.cfg.k)
        while True:
            tops = torch.cat([self.pre_acts(x[i:i + chunk_rows]).topk(width, dim=1).values
                              for i in range(0, n, chunk_rows)])  # (N, c) descending per row
            cut = _largest(tops, n * self.cfg.k)
            # A row whose c-th value clears the cut may hold more above it: widen and recount.
            if width == self.cfg.d_sae or not bool((tops[:, -1] >= cut).any()):
                break
            width = min(self.cfg.d_sae, 2 * width)
        theta = float(cut.clamp_min(torch.finfo(cut.dtype).tiny))
        self.threshold.fill_(theta)
        return theta

    def select_active(self, x: Tensor, dead: Tensor | None, train: bool = False) -> Selection:
        """Training: the batch-wide cut over each row's exact top candidates. Inference: θ over all pre-activations,
        since θ gives rows different widths."""
        if not train:
            pre = scratch((x.shape[0], self.cfg.d_sae), self.W_enc.dtype, self.W_enc.device)  # (N, d_sae)
            torch.addmm(self.b_enc, self.encoder_input(x), self.W_enc, out=pre)
            return self.select_from_pre(pre, dead, train)
        xc = self.encoder_input(x)
        sel, slots, keep = self._widened_cut(lambda width: self.row_topk(xc, dead, width))
        return Selection(sel.values.gather(1, slots), sel.indices.gather(1, slots), keep, sel.aux_values,
                         sel.aux_indices)

    def _widened_cut(self, candidates: Callable[[int], Selection]) -> tuple[Selection, Tensor, Tensor]:
        """The batch cut over each row's `width` best candidates (`candidates(width)`), widening them while some
        row keeps all of its own (it might hold more above the cut); returns the candidates, slots and keep mask.

        Starts from the width the last batches needed: widening redoes the whole selection. The result does not
        depend on the width, only the time does.
        """
        d, narrowest = self.cfg.d_sae, min(self.cfg.d_sae, 4 * self.cfg.k)
        width = max(narrowest, min(d, self._candidate_width))
        while True:
            sel = candidates(width)
            slots, keep, row_full = self._batch_cut(sel.values)
            if width == d or not row_full:
                break
            width = min(d, 2 * width)
        used = slots.shape[1]
        self._candidate_width = width // 2 if 4 * used < width and width // 2 >= narrowest else width
        return sel, slots, keep

    def _batch_cut(self, values: Tensor) -> tuple[Tensor, Tensor, bool]:
        """Which of the per-row candidates (N, c) are among the B·k largest positive values of the batch.

        Returns the slots to keep per row (N, K), K the largest row count, in the candidates' ascending latent
        order (padded with the next best, unkept), their keep mask, and whether some row kept all c candidates.
        """
        n, c = values.shape
        cut = _largest(values, n * self.cfg.k)
        keep = (values >= cut) & (values > 0)  # (N, c)
        # The step's one host read: K, the widest row, sizes the decoder's slots by the data. Both numbers come
        # back in one transfer so a GPU waits once per step, not once per question.
        used, row_full = (int(v) for v in torch.stack([keep.sum(1).max(), keep.all(1).any()]).tolist())
        used = max(1, used)
        # The kept slots are the row's best values; pad with the next best (as the dense reference does), then put
        # them back in ascending latent order.
        if _on_host(values):  # numpy's argpartition: ~10× torch's row argsort here
            best = np.argpartition(-values.numpy(), used - 1, axis=1)[:, :used] if used < c else np.arange(c)[None]
            slots = torch.from_numpy(np.sort(best, axis=1)).expand(n, used)
        else:
            slots = values.argsort(dim=1, descending=True, stable=True)[:, :used].sort(dim=1).values
        return slots, keep.gather(1, slots).to(values.dtype), bool(row_full)

    def forward(self, x: Tensor, target: Tensor | None = None, dead_mask: Tensor | None = None,
                sparsity_coefficient: float | None = None, dead_latents: Tensor | None = None,
                **_: Any) -> ForwardOutput:
        """TopK forward with batch selection; in train mode also updates θ (see the module docstring)."""
        out = super().forward(x, target=target, dead_mask=dead_mask, dead_latents=dead_latents)
        if self.training:
            with torch.no_grad():
                self._update_threshold(out.latent_acts)
        return out

    def _update_threshold(self, acts: Tensor) -> None:
        """θ ← EMA of the smallest kept activation (set outright the first time); nothing kept, nothing changes.
        Device ops only: a step must not wait for the GPU to learn whether anything was kept."""
        smallest = torch.where(acts > 0, acts, torch.inf).min().to(self.threshold.dtype)  # inf: none kept
        updated = torch.where(self.threshold <= 0, smallest, torch.lerp(smallest, self.threshold, self.threshold_decay))
        self.threshold.copy_(torch.where(smallest.isfinite(), updated, self.threshold))


def _on_host(t: Tensor) -> bool:
    """Whether t lives in host memory, where numpy's selection routines beat torch's and reading is free (numpy has
    no bfloat16: such values take torch's routines)."""
    return t.device.type == "cpu" and t.dtype != torch.bfloat16


def _largest(values: Tensor, rank: int) -> Tensor:
    """The rank-th largest of all values (their minimum if there are no more than rank), as a 0-d tensor.

    On CPU numpy's introselect, ~10× torch's kthvalue on a batch of candidates. On CUDA a sort: `kthvalue` runs one
    thread block per slice, and all N·width candidates are one slice (pytorch/pytorch#75599: 20× slower than a sort).
    """
    flat = values.detach().reshape(-1)
    if rank >= flat.numel():
        return flat.min()
    if _on_host(flat):
        return torch.as_tensor(np.partition(flat.numpy(), flat.numel() - rank)[flat.numel() - rank])
    return flat.sort().values[flat.numel() - rank]
