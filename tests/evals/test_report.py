"""The HTML report: self-contained, one figure per plot, a scoreboard, renders in headless Chromium without JS errors."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from synthetic import letters_world, pair_world, planted_sae, planted_tasks

from evals import metrics as M
from evals.evaluate import SAEEvalResult
from evals.report import TABLE_KEYS, build_report, scoreboard_table


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


def suite_sections() -> dict:
    """Real sections of every concept suite, from small planted worlds (fast)."""
    from evals.absorption import AbsorptionConfig, run_absorption
    from evals.consistency import run_consistency
    from evals.probing import ProbingConfig, run_probing
    from evals.scr import ScrConfig, run_scr, run_tpp

    tasks, dirs = planted_tasks(n_tasks=3, d=16, n=200)
    sae = planted_sae(dirs, k=3)
    sae_label = "/runs/sae_0"
    x, data, letter_dirs, token_dirs, _ = letters_world(n_tokens=30)
    letter_sae = planted_sae(torch.cat([letter_dirs, token_dirs]), k=2)
    pair, pair_dirs = pair_world(n=400)
    fast = ScrConfig(n_values=(1, 2, 20), probe_epochs=3)
    return {
        "probing": [run_probing(tasks, [(sae_label, sae)], ProbingConfig(ks=(1, 2), n_resamples=200))],
        "absorption": [run_absorption(x, data, [(sae_label, letter_sae)], tasks.hook_point,
                                      AbsorptionConfig(probe_epochs=20, sparse_probe_epochs=10, max_k=3))],
        "consistency": run_consistency([(sae_label, sae), ("/runs/sae_1", planted_sae(dirs.flip(0), k=3))]),
        "scr": [run_scr([pair], tasks.hook_point, [(sae_label, planted_sae(pair_dirs, k=3))], fast)],
        "tpp": [run_tpp(tasks, [(sae_label, sae)], fast)],
    }


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


def test_report_has_a_scoreboard_and_a_figure_per_suite():
    sections = suite_sections()
    html = build_report(fake_results(2), sections)
    assert len(plot_divs(html)) == 4 + 5  # core's four, then probing, absorption, consistency, scr, tpp
    board = html[html.index("<h2>Scoreboard</h2>"):html.index('<div class="plot">')]
    for title in ("probe top-1", "control top-1", "absorption rate", "fully absorbed", "SCR@20", "TPP@20", "MCC"):
        assert title in board, title
    assert board.count("<tr>") == 3  # header, sae_0 and sae_1 (the consistency partner is core's second SAE)
    only_suites = build_report([], {"consistency": sections["consistency"]})
    assert len(plot_divs(only_suites)) == 1 and "<h2>Metrics</h2>" not in only_suites


def test_scoreboard_shows_a_missing_ci_as_n_a():
    # one probing task: the CI bounds are NaN in memory and null once read back from metrics.json
    for bounds in ([float("nan"), float("nan")], [None, None]):
        html = scoreboard_table([{"sae_path": "runs/sae", "probe_top1_minus_control": 0.3,
                                  "probe_top1_minus_control_ci": bounds}])
        assert "[n/a, n/a]" in html and "nan" not in html.lower() and "None" not in html


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
    html = build_report(fake_results(2), suite_sections())
    # A copy with an error collector first in <head>, so errors from any later script are caught.
    page = tmp_path / "report.html"
    page.write_text(html.replace("<head>", "<head>" + ERROR_COLLECTOR, 1), encoding="utf-8")
    dom = render_dom(page, tmp_path)
    match = re.search(r'data-js-errors="([^"]*)"', dom)
    assert match, "the error collector never ran: the page did not finish loading"
    assert match.group(1) == "[]", f"JS errors: {match.group(1)}"
    divs = plot_divs(dom)
    assert len(divs) == 9  # core's four and one per concept suite
    for i, div in enumerate(divs):
        assert 'class="main-svg"' in div, f"figure {i} did not render"
