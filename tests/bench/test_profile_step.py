"""bench/profile_step.py splits a step into phases that add up to it, and lists the kernels, on a CPU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_profile_step_phases_and_kernels(tmp_path, capsys, arch):
    from bench import profile_step

    out = tmp_path / "p.json"
    profile_step.main(["--shape", "32,256,4", "--batch", "128", "--rounds", "2", "--rows", "1000", "--json", str(out),
                       "--arch", arch])
    text = capsys.readouterr().out
    got = json.loads(out.read_text())
    assert list(got["phases_ms"]) == ["select (encoder product + top-k)", "gather + sparse decode + loss",
                                      "backward (sparse)", "Adam"]
    assert all(ms > 0 for ms in got["phases_ms"].values())
    assert abs(sum(got["phases_ms"].values()) - got["step_ms"]) < 1e-6
    # every kernel listed (a short list ranks by time, so which ops make it depends on the machine's noise)
    assert "aten::mm" in got["kernels"] and "Kernels over 3 steps" in text and got["arch"] == arch
