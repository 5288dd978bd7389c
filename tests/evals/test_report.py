"""The HTML report: self-contained, one figure per plot, renders in headless Chromium without JS errors."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from evals import metrics as M
from evals.evaluate import SAEEvalResult
from evals.report import TABLE_KEYS, build_report


def fake_results(n: int) -> list[SAEEvalResult]:
    """Results with real sparsity statistics from random latents and plausible records."""
    torch.manual_seed(0)
    out = []
    for i in range(n):
        z = torch.relu(torch.randn(200, 64) - 1.0 - 0.3 * i)  # (tokens, d_sae): sparser for larger i
        st = M.sparsity_stats(z)
        record = {k: 0.5 for k in TABLE_KEYS} | {"sae_path": f"/runs/sae_{i}", "architecture": "topk",
                                                  "hook_point": "blocks.0.hook_resid_post", "d_sae": 64}
        record.update(M.sparsity_metrics(st))
        record["fvu"] = 0.1 * (i + 1)
        record["ce_loss_recovered"] = 0.9 - 0.1 * i
        out.append(SAEEvalResult(record=record, sparsity=st))
    return out


def plot_divs(html: str) -> list[str]:
    return re.split(r'<div class="plot">', html)[1:]


def test_report_is_self_contained() -> None:
    html = build_report(fake_results(3))
    assert len(plot_divs(html)) == 4  # density, L0, and two frontiers for a sweep
    assert html.count("<script src=") == 0  # nothing fetched: plotly.js inlined
    assert len(html) > 1_000_000  # plotly.js itself is ~3-4 MB
    assert "/runs/sae_2" in html and "ce_loss_recovered" in html
    single = build_report(fake_results(1))
    assert len(plot_divs(single)) == 2  # no frontier for one SAE
    with pytest.raises(ValueError, match="no eval results"):
        build_report([])


ERROR_COLLECTOR = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message)); });
window.addEventListener('load', function () {
  setTimeout(function () {
    document.body.setAttribute('data-js-errors', JSON.stringify(window.__errors));
  }, 1000);
});
</script>"""


def render_dom(html_path: Path, tmp_path: Path) -> str:
    """The DOM after scripts ran, from headless Chromium."""
    cmd = [
        shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom",
        html_path.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs the chromium binary on PATH")
def test_report_renders_in_chromium(tmp_path: Path) -> None:
    html = build_report(fake_results(2))
    # A copy with an error collector first in <head>, so errors from any later script are caught.
    page = tmp_path / "report.html"
    page.write_text(html.replace("<head>", "<head>" + ERROR_COLLECTOR, 1), encoding="utf-8")
    dom = render_dom(page, tmp_path)
    match = re.search(r'data-js-errors="([^"]*)"', dom)
    assert match, "the error collector never ran: the page did not finish loading"
    assert match.group(1) == "[]", f"JS errors: {match.group(1)}"
    divs = plot_divs(dom)
    assert len(divs) == 4
    for i, div in enumerate(divs):
        assert 'class="main-svg"' in div, f"figure {i} did not render"
