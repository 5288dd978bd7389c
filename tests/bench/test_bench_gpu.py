"""bench/bench_gpu.py runs on a CPU-only machine (small shapes) and prints every ratio it promises."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_bench_gpu_quick_prints_the_ratios(capsys):
    from bench import bench_gpu
    from sae_kit.sae.native import bf16_matmul_units

    bench_gpu.main(["--quick", "--skip-peers"])
    out = capsys.readouterr().out
    for expected in ("ms/step", "ours / fp32 matmul", "ours loop step",
                     "of the bare step", "sae-kit train --activations", "== 3. Caching", "of the forward"):
        assert expected in out, expected
    # the bf16 roofline only where bf16 matmuls run on matrix units (CUDA, or a CPU with AMX), not emulated
    assert ("ours / bf16 matmul" in out) == bf16_matmul_units()
    assert out.count("of the bare step") == 2
