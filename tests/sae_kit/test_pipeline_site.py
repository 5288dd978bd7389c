"""The results site: its sections, self-containedness and determinism; in headless Chromium, no JS errors, every
figure rendered, and a screenshot with something drawn in every figure's box."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from evals import metrics as M
from sae_kit.pipeline.metric_defs import METRICS
from sae_kit.pipeline.site import build_site, l0_varies


def fake_saes(n: int, l0_varies_in: tuple[int, ...] = ()) -> list[dict]:
    """Gathered SAEs with real sparsity statistics (TopK-like unless listed in l0_varies_in)."""
    torch.manual_seed(0)
    out = []
    for i in range(n):
        k = 4 * (i + 1)
        if i in l0_varies_in:
            z = torch.relu(torch.randn(400, 64) - 1.2)  # (tokens, d_sae): L0 varies per token
        else:
            z = torch.zeros(400, 64)
            idx = 1 + torch.rand(400, 47).argsort(dim=1)[:, :k - 1]  # k − 1 distinct of latents 1..47: 16 dead
            z.scatter_(1, idx, 1.0)
            z[:, 0] = 1.0  # and latent 0 on every token (dense): exactly k per token
        st = M.sparsity_stats(z)
        record = {"architecture": "topk", "hook_point": "blocks.1.hook_resid_post", "d_sae": 64,
                  "fvu": 0.5 / (i + 1), "ce_loss_recovered": 0.8 + 0.05 * i, "explained_variance": 0.6,
                  "kl_score": 0.7, **M.sparsity_metrics(st)}
        interp = {"metric": "auroc", "sae": {"mean": 0.6 + 0.02 * i, "ci_low": 0.55, "ci_high": 0.66},
                  "control": {"mean": 0.52, "ci_low": 0.48, "ci_high": 0.56},
                  "difference": {"mean": 0.08, "ci_low": 0.01, "ci_high": 0.15}}
        steer = {"prompts": ["def f("], "mode": "add", "latents": [
            {"latent": 3, "score": 0.9, "metric": "auroc", "explanation": "Fires on <self>",
             "logit_lens": {"promoted": [["self", 1.0]], "suppressed": [["x", -1.0]]}}]}
        sweep = [{"label": "latent 3", "points": [
            {"strength": s, "concept_score": 0.1 * s, "perplexity": 5.0 + s, "kl": 0.1 * s,
             "latent_activation": 1.0, "texts": [f"text at {s:g} <b>"]} for s in (0.0, 4.0)]}]
        out.append({"name": f"topk_k{k}", "record": record, "sparsity": st, "interp": interp, "steer": steer,
                    "sweep": sweep, "links": {"eval report": f"eval/topk_k{k}/report.html",
                                              "feature dashboard": f"interp/topk_k{k}/sae/dashboard.html",
                                              "steering": f"steer/topk_k{k}/sweep.html"}})
    return out


def config(out: Path) -> SimpleNamespace:
    return SimpleNamespace(out=str(out), model="reference", source="my.yaml", eval={"dense_threshold": 0.1},
                           site=SimpleNamespace(title=None))


def plot_divs(page: str) -> list[str]:
    return re.split(r'<div class="plot">', page)[1:]


def test_sections_follow_the_sweep_and_l0(tmp_path):
    sweep = build_site(config(tmp_path), fake_saes(3))
    # four sweep plots and the density; no L0 histogram: every SAE is TopK-like, its L0 the same on every token
    assert len(plot_divs(sweep)) == 5
    assert "L0 vs FVU" in sweep and "L0 vs CE loss recovered" in sweep and "Interp score vs L0" in sweep
    assert "Dead and dense latents" in sweep and "L0 per token" not in sweep
    varied = build_site(config(tmp_path), fake_saes(3, l0_varies_in=(1,)))
    assert len(plot_divs(varied)) == 6 and "L0 per token" in varied
    single = build_site(config(tmp_path), fake_saes(1))
    assert len(plot_divs(single)) == 1 and "L0 vs FVU" not in single  # density only
    assert l0_varies(fake_saes(1, (0,))[0]["sparsity"]) and not l0_varies(fake_saes(1)[0]["sparsity"])


def test_topk_whose_relu_zeroes_kept_values_gets_its_l0_histogram():
    # TopK's L0 is at most k, not k (docs/metrics.md): the ReLU after top-k zeroes kept pre-activations ≤ 0
    from sae_kit.sae import SAEConfig, SparseCoder

    torch.manual_seed(0)
    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=16, d_sae=32, k=16))
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)
        st = M.sparsity_stats(sae.encode(torch.randn(200, 16)))
    assert M.sparsity_metrics(st)["l0"] < 16 and l0_varies(st)


def test_self_contained_linked_explained_and_deterministic(tmp_path):
    saes = fake_saes(2)
    page = build_site(config(tmp_path), saes)
    assert page.count("<script src=") == 0 and len(page) > 1_000_000  # plotly.js inlined
    assert page.count("plotly.js v") == 1  # once
    assert build_site(config(tmp_path), saes) == page  # same results, same bytes
    for m in METRICS.values():  # hover definition and a link to the formula for every metric shown
        assert f'id=\'def-{m.anchor}\'' in page
    hover = html.escape(METRICS["fvu"].definition, quote=True)
    assert f'<abbr title="{hover}">FVU</abbr><a class="f" href="#def-fvu"' in page
    for s in saes:
        for target in s["links"].values():
            assert f'href="{target}"' in page
    assert "text at 4 &lt;b&gt;" in page and "“Fires on &lt;self&gt;”" in page  # steering demo, escaped
    assert "0.52" in page  # the control's score beside the SAE's


ERROR_COLLECTOR = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message)); });
window.addEventListener('load', function () {
  setTimeout(function () {
    var boxes = Array.from(document.querySelectorAll('.plot')).map(function (d) {
      var r = d.getBoundingClientRect();
      return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height];
    });
    document.body.setAttribute('data-js-errors', JSON.stringify(window.__errors));
    document.body.setAttribute('data-boxes', JSON.stringify(boxes));
    document.body.setAttribute('data-height', String(document.documentElement.scrollHeight));
  }, 1000);
});
</script>"""
WIDTH = 1400


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
           "--hide-scrollbars", "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=8000", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs the chromium binary on PATH")
def test_site_renders_in_chromium_and_every_figure_draws(tmp_path):
    from PIL import Image

    page = tmp_path / "index.html"
    html = build_site(config(tmp_path), fake_saes(3, l0_varies_in=(2,)))
    page.write_text(html.replace("<head>", "<head>" + ERROR_COLLECTOR, 1), encoding="utf-8")
    dom = chromium([f"--window-size={WIDTH},1000", "--dump-dom", page.as_uri()], tmp_path).stdout
    errors = re.search(r'data-js-errors="([^"]*)"', dom)
    assert errors, "the collector never ran: the page did not finish loading"
    assert errors.group(1) == "[]", f"JS errors: {errors.group(1)}"
    divs = plot_divs(dom)
    assert len(divs) == 6
    for i, div in enumerate(divs):
        assert 'class="main-svg"' in div, f"figure {i} did not render"
    boxes = json.loads(re.search(r'data-boxes="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    height = int(re.search(r'data-height="(\d+)"', dom).group(1))
    shot = tmp_path / "shot.png"
    chromium([f"--window-size={WIDTH},{height}", f"--screenshot={shot}", page.as_uri()], tmp_path)
    img = Image.open(shot).convert("RGB")
    assert img.size[0] == WIDTH
    for i, (x, y, w, h) in enumerate(boxes):
        # the box's background is white: count the pixels something was drawn on
        crop = img.crop((int(x) + 4, int(y) + 4, int(x + w) - 4, int(y + h) - 4))
        drawn = sum(1 for px in crop.getdata() if min(px) < 235)
        assert drawn > 0.01 * crop.size[0] * crop.size[1], f"figure {i} at {(x, y, w, h)} is blank ({drawn} px)"


def test_undefined_interp_ci_reads_n_a_not_nan(tmp_path):
    from autointerp.metrics import bootstrap_ci
    from sae_kit.pipeline.summary import _stats

    one = _stats([0.7], seed=0)  # one scored latent: no interval (bootstrap_ci gives NaN bounds)
    assert all(v != v for v in bootstrap_ci([0.7])) and one["ci_low"] is None and one["ci_high"] is None
    saes = fake_saes(2)
    for s in saes:
        s["interp"]["sae"] = one
        s["interp"]["difference"] = {**s["interp"]["difference"], "ci_low": None, "ci_high": None}
    page = build_site(config(tmp_path), saes)
    text = re.sub(r"<script.*?</script>", "", page, flags=re.S)
    assert "n/a" in text and not re.search(r"\bnan\b", text, flags=re.I)
