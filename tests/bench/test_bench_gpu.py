"""bench/bench_gpu.py runs on a CPU-only machine (small shapes) and prints every ratio it promises."""
from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_bench_gpu_quick_prints_the_ratios(capsys):
    from bench import bench_gpu
    from sae_kit.sae.native import bf16_matmul_units

    bench_gpu.main(["--quick", "--skip-peers"])
    out = capsys.readouterr().out
    for expected in ("ms/step", "ours / fp32 matmul", "ours loop step", "host time per step", "aten ops",
                     "of the bare step", "sae-kit train --activations", "== 3. Caching", "of the forward",
                     "sae-kit train --activations loop, with its feed", "store reader + feed alone (per batch",
                     "cache stages", "waited for tokens", "waited for writers", "sha256", "open+fsync+rename",
                     "host stages of one shard alone", "old_path", "new_path_parallel"):
        assert expected in out, expected
    # the bf16 roofline only where bf16 matmuls run on matrix units (CUDA, or a CPU with AMX), not emulated
    assert ("ours / bf16 matmul" in out) == bf16_matmul_units()
    # train() on tensors, train --activations, the store reader alone, train --activations with the feed on 1 and
    # on 4 threads (the A/B of feed.FEED_THREADS); the host time of train --activations' loop
    assert out.count("of the bare step") == 6
    assert "sae-kit train --activations, feed on 1 thread " in out and "feed on 4 threads" in out


def test_bench_gpu_parts_write_json_that_the_h200_summary_reads(tmp_path, capsys):
    """bench/h200/run.sh runs bench_gpu.py one part per process with --shapes/--contenders/--json, then summary.py."""
    import json
    import subprocess

    from bench import bench_gpu

    with_host = tmp_path / "with_host.jsonl"
    args = ["--skip-pipeline", "--skip-cache", "--shapes", "32x64x4", "--contenders", "ours,fp32mm", "--rounds", "1",
            "--threads", "1", "--json"]
    assert bench_gpu.main([*args, str(with_host)]) == 0
    records = [json.loads(line) for line in with_host.read_text().splitlines()]
    assert [r["section"] for r in records] == ["run", "step", "step", "host"]  # host: of the contenders, ours
    assert records[-1]["contender"] == "ours" and records[-1]["aten_ops"] > 10 and records[-1]["us"] > 0
    results = tmp_path / "results.jsonl"
    assert bench_gpu.main(["--skip-host", *args, str(results)]) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["section"] for r in records] == ["run", "step", "step"]
    assert [(r["contender"], r["status"], r["d_sae"]) for r in records[1:]] == [("ours", "ok", 64), ("fp32mm", "ok", 64)]
    capsys.readouterr()
    out = subprocess.run([sys.executable, "bench/h200/summary.py", str(with_host)], capture_output=True, text=True,
                         cwd=Path(bench_gpu.__file__).parents[1], check=True).stdout
    assert "32 × 64, k 4" in out and "ours/sparsify" in out and "host time per step" in out
    grouped = json.loads((tmp_path / "results.json").read_text())
    assert len(grouped["step"]) == 2 and len(grouped["host"]) == 1 and "32x64" in grouped["goals"]
    for script in ("run.sh", "fetch_wheels.sh"):  # the device call's script must at least parse
        subprocess.run(["bash", "-n", str(Path(bench_gpu.__file__).parent / "h200" / script)], check=True)


def test_a_contender_out_of_memory_is_released_before_the_next_one(monkeypatch, capsys):
    """A contender whose step runs out of memory is reported, and its step (SAE, optimiser) is freed before the next
    contender is built and its peak memory measured."""
    from bench import bench_gpu

    class Greedy:
        def __init__(self) -> None:
            self.me = self  # a reference cycle, as modules and optimisers may hold: only the collector frees it

        def __call__(self) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")

    pending = [Greedy()]  # handed out once; the bench holds the only reference after that
    alive = weakref.ref(pending[0])
    monkeypatch.setattr(bench_gpu, "ours", lambda *a, **k: pending.pop())
    seen = []

    def next_contender(*a, **k):
        seen.append(alive())
        return lambda: None

    monkeypatch.setattr(bench_gpu, "ours_loop_step", next_contender)
    gc.disable()  # only the bench's own collection may free the cycle
    try:
        bench_gpu.bench_steps(((8, 32, 2),), 16, torch.device("cpu"), rounds=1, peers=False)
    finally:
        gc.enable()
    out = capsys.readouterr().out
    assert "out of memory" in out and "ours / " not in out  # no ratio of another contender labelled as ours
    assert seen == [None]


def test_the_marginal_rate_leaves_one_time_warm_up_costs_out(monkeypatch):
    """The first run in a process pays one-time costs (on the H200 they made train() on tensors 6.99× the bare step):
    an unmeasured run goes first, so the rate is the steady state's. On a virtual clock: 1 s a step, 100 s once."""
    from types import SimpleNamespace

    from bench import bench_gpu

    clock = [0.0]
    monkeypatch.setattr(bench_gpu, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = []

    def run(n_steps: int) -> None:
        clock[0] += n_steps + (100.0 if not calls else 0.0)
        calls.append(n_steps)

    assert bench_gpu._marginal_rate(run, 10, 40) == 1.0
    assert calls == [10, 10, 40]
