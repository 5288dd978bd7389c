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
        """The B·k largest positive pre-activations of the batch, as per-row padded (indices, keep mask).

        Only each row's top c candidates are ranked; if some row keeps all c of them it might hold more, so c
        doubles and the selection repeats. Exact (up to ties) on return.
        """
        n, d = pre.shape
        budget = n * self.cfg.k
        width = min(d, 4 * self.cfg.k)
        while True:
            vals, idx = pre.topk(width, dim=1)  # (N, c) descending per row
            flat = vals.reshape(-1)
            cut = flat.kthvalue(flat.numel() - budget + 1).values if budget < flat.numel() else flat.min()
            keep = (vals >= cut) & (vals > 0)  # (N, c), a prefix of each row
            if width == d or not bool(keep[:, -1].any()):
                break
            width = min(d, 2 * width)
        used = max(1, int(keep.sum(1).max()))
        idx, keep = idx[:, :used], keep[:, :used]
        order = idx.argsort(dim=1)  # ascending latents per row, as the sparse kernels want
        return idx.gather(1, order), keep.gather(1, order).to(pre.dtype)

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
            flat = tops.reshape(-1)
            budget = n * self.cfg.k
            cut = flat.kthvalue(flat.numel() - budget + 1).values if budget < flat.numel() else flat.min()
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
        d, narrowest = self.cfg.d_sae, min(self.cfg.d_sae, 4 * self.cfg.k)
        # Start from the width the last batches needed: widening redoes the whole selection. The result does not
        # depend on the width, only the time does.
        width = max(narrowest, min(d, self._candidate_width))
        while True:
            sel = self.row_topk(xc, dead, width)  # each row's `width` best, ascending indices
            slots, keep, row_full = self._batch_cut(sel.values)
            # A row that keeps all of its candidates might hold more above the cut: widen and redo.
            if width == d or not row_full:
                break
            width = min(d, 2 * width)
        used = slots.shape[1]
        self._candidate_width = width // 2 if 4 * used < width and width // 2 >= narrowest else width
        return Selection(sel.values.gather(1, slots), sel.indices.gather(1, slots), keep, sel.aux_values,
                         sel.aux_indices)

    def _batch_cut(self, values: Tensor) -> tuple[Tensor, Tensor, bool]:
        """Which of the per-row candidates (N, c) are among the B·k largest positive values of the batch.

        Returns the slots to keep per row (N, K), K the largest row count, in the candidates' ascending latent
        order (padded with the next best, unkept), their keep mask, and whether some row kept all c candidates.
        """
        n, c = values.shape
        budget = n * self.cfg.k
        flat = values.reshape(-1)
        on_cpu = values.device.type == "cpu"  # numpy's introselect: ~10× torch's kthvalue and row argsort here
        if budget >= flat.numel():
            cut = flat.min()
        elif on_cpu:
            cut = torch.as_tensor(np.partition(flat.numpy(), flat.numel() - budget)[flat.numel() - budget])
        else:
            cut = flat.kthvalue(flat.numel() - budget + 1).values
        keep = (values >= cut) & (values > 0)  # (N, c)
        used = max(1, int(keep.sum(1).max()))
        # The kept slots are the row's best values; pad with the next best (as the dense reference does), then put
        # them back in ascending latent order.
        if on_cpu:
            best = np.argpartition(-values.numpy(), used - 1, axis=1)[:, :used] if used < c else np.arange(c)[None]
            slots = torch.from_numpy(np.sort(best, axis=1)).expand(n, used)
        else:
            slots = values.argsort(dim=1, descending=True, stable=True)[:, :used].sort(dim=1).values
        return slots, keep.gather(1, slots).to(values.dtype), bool(keep.all(1).any())

    def forward(self, x: Tensor, target: Tensor | None = None, dead_mask: Tensor | None = None,
                sparsity_coefficient: float | None = None, **_: Any) -> ForwardOutput:
        """TopK forward with batch selection; in train mode also updates θ (see the module docstring)."""
        out = super().forward(x, target=target, dead_mask=dead_mask)
        if self.training:
            with torch.no_grad():
                kept = out.latent_acts[out.latent_acts > 0]
                if kept.numel():
                    smallest = kept.min().to(self.threshold.dtype)
                    first = bool(self.threshold <= 0)
                    self.threshold.copy_(smallest if first else torch.lerp(smallest, self.threshold,
                                                                           self.threshold_decay))
        return out
