"""bench/param_traffic.py: the counter counts what ops move, and the trainer's step stays within its passes."""
from __future__ import annotations

import os

import pytest
import torch

from bench import param_traffic as pt


def test_the_counter_counts_reads_and_writes_of_large_tensors_only():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    unit = a.numel() * 4
    with pt.TrafficCounter(unit, min_bytes=unit // 100) as c:
        a.add_(b)  # read a, read b, write a
        c_ = a + b  # read a, read b, write the sum
        a.T.contiguous()  # a view (nothing), then a copy (read, write)
        torch.mul(a, 2.0, out=c_)  # read a; out= is written, not read
        torch.ones(3).add_(1)  # under the size floor
    t = c.traffic
    assert (t.passes("add_"), t.passes("add"), t.passes("mul")) == (3, 3, 2)
    assert t.passes("clone") == 2 and "t" not in t.calls and "transpose" not in t.calls
    assert t.passes() == 10


def test_the_step_adopts_fresh_gradients_and_folds_clipping_into_adam():
    """No pass zeroes a gradient, adds into one or scales one; the decoder fix makes no full-size temporaries."""
    t = pt.ours("topk", d_in=128, d_sae=4096, k=16, batch=128)
    assert not {"zero_", "_foreach_zero_", "add_", "_foreach_add_", "_foreach_mul_", "mul_"} & set(t.calls), t.calls
    # 16 of Adam (p, m, v read and written, the gradient read and written back clipped), 6 of the decoder-direction
    # fix, 3 of the renormalisation, 2 of the gradient norm, the encoder product and the sparse gathers: 35.1 at
    # this shape, against 55.1 with zeroed gradients, a separate clipping pass and the temporaries of the fix.
    assert t.passes() < 37, {op: round(t.passes(op), 2) for op in t.calls}


def test_the_report_runs_for_every_architecture(capsys):
    pytest.importorskip("sae_kit")
    assert pt.main(["--shape", "256x4096x8", "--scale", "4", "--arch", "all"]) == 0
    out = capsys.readouterr().out
    assert "sae-kit topk" in out and "sae-kit jumprelu" in out and "passes" in out


def test_the_exact_route_is_counted_and_then_put_back(monkeypatch):
    """`--exact` counts the step through kernels.bf16_rescored_topk (its bf16 copy, norms and threshold count come on
    top), and leaves the CPU's own route and the switch as they were."""
    from sae_kit.sae import kernels
    from sae_kit.sae.topk import TopKSAE

    monkeypatch.delenv(kernels.BF16_SWITCH, raising=False)
    calls = []
    real = kernels.bf16_rescored_topk
    monkeypatch.setattr("sae_kit.sae.topk.bf16_rescored_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    route = TopKSAE.row_topk
    plain = pt.ours("topk", d_in=128, d_sae=4096, k=16, batch=128)
    assert not calls
    exact = pt.ours("topk", d_in=128, d_sae=4096, k=16, batch=128, exact=True)
    assert calls and exact.passes() > plain.passes() + 5
    assert TopKSAE.row_topk is route and kernels.BF16_SWITCH not in os.environ
