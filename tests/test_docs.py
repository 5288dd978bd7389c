"""Every snippet of docs/ and the README's Python tour runs as written.

The pages run in stage order in one folder, each page's Python blocks in one namespace; `sae-kit ...` lines of
```bash blocks go through the CLI's own entry point (in this process, so the code under test runs); a fenced block
right after `<!-- file: PATH -->` is written to PATH first. Blocks of other languages are shown, not run.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from sae_kit.cli import main
from sae_kit.pipeline.metric_defs import METRICS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ORDER = ["metrics.md", "cache.md", "train.md", "eval.md", "interp.md", "steer.md", "run.md"]
FENCE = re.compile(r"(?:<!-- file: (?P<file>\S+) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.S)


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, body, file to write it to) of every fenced block, in order."""
    return [(m["lang"], m["body"], m["file"]) for m in FENCE.finditer(text)]


def run_blocks(text: str, where: str) -> None:
    namespace: dict = {"__name__": f"docs_{where}"}
    for lang, body, file in blocks(text):
        if file:
            Path(file).parent.mkdir(parents=True, exist_ok=True)
            Path(file).write_text(body)
        elif lang == "python":
            exec(compile(body, f"{where} (python block)", "exec"), namespace)
        elif lang == "bash":
            for line in body.splitlines():
                args = shlex.split(line, comments=True)
                if args and args[0] == "sae-kit":
                    assert main(args[1:]) == 0, f"{where}: `{line}` failed"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("docs")


@contextlib.contextmanager
def inside(folder: Path):
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def test_every_page_is_run():
    assert sorted(ORDER) == sorted(p.name for p in DOCS.glob("*.md") if p.name != "index.md")
    assert all(blocks((DOCS / name).read_text()) for name in ORDER)


@pytest.mark.parametrize("page", ORDER)
def test_snippets_of_page_run(page, workdir):
    torch.manual_seed(0)
    with inside(workdir):
        run_blocks((DOCS / page).read_text(), page)


def test_readme_python_tour_runs(workdir):
    with inside(workdir):
        text = (ROOT / "README.md").read_text()
        python = [(lang, body, None) for lang, body, _ in blocks(text) if lang == "python"]
        assert python
        run_blocks("".join(f"```python\n{body}```\n" for _, body, _ in python), "README.md")


def test_site_definitions_are_the_docs_formulas():
    text = (DOCS / "metrics.md").read_text()
    for key, m in METRICS.items():
        assert f'<a id="{m.anchor}"></a>' in text, f"docs/metrics.md has no anchor for {key}"
        assert f"    {m.formula}\n" in text, f"the formula of {key} differs between metric_defs and docs/metrics.md"
