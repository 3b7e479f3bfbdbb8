"""The notebooks run as shipped, and their HTML export shows every figure in a real browser.

Each notebook runs in a fresh kernel (``notebooks/run.py``, as ``make notebooks`` does); its
offline HTML export is then opened in headless Chromium, which must draw one picture per figure
output and log no console error. Exports and screenshots stay in ``build/`` as artefacts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _module("notebooks_run", ROOT / "notebooks" / "run.py")
browser = _module("browser", ROOT / "tests" / "browser.py")

_executed: dict[str, object] = {}


def executed(path: Path, tmp_path_factory) -> object:
    """The notebook run once per test session (the browser test reuses the run)."""
    if path.name not in _executed:
        _executed[path.name] = run.execute(path, cwd=tmp_path_factory.mktemp(path.stem))
    return _executed[path.name]


def figures(notebook) -> int:
    """Outputs that are a figure: a plotly figure, an image, or the explorer."""
    kinds = ("application/vnd.plotly.v1+json", "image/png", "application/vnd.jupyter.widget-view+json")
    return sum(
        any(k in o.get("data", {}) for k in kinds) for cell in notebook.cells for o in cell.get("outputs", [])
    )


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("path", run.NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_without_errors(path, tmp_path_factory):
    notebook = executed(path, tmp_path_factory)  # raises CellExecutionError, naming the cell, on an error
    assert figures(notebook) >= 2
    widgets = notebook.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    if "explore(" in "".join(c.source for c in notebook.cells):
        assert widgets.get("state"), "the explorer's widget state is saved with the notebook"


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("path", run.NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_html_shows_every_figure_in_chromium(path, tmp_path_factory):
    pytest.importorskip("playwright", reason="Playwright drives the browser (the dev extra installs it)")
    if browser.chromium() is None:
        pytest.skip("no chromium: `make browser` installs Debian's chromium")
    notebook = executed(path, tmp_path_factory)
    expected = figures(notebook)
    pngs = sum("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))
    assert pngs == expected, "every figure keeps a static PNG (attnlens.viz.static_images)"
    html = run.to_html(notebook, BUILD / "notebooks" / f"{path.stem}.html")
    page = browser.open_page(html, BUILD / "screenshots" / f"{path.stem}.png", plots=0)
    assert page.errors == []
    assert page.images == expected
