"""The tutorials run as shipped (the notebooks: test_notebooks.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from attnlens.testing import tiny_flux_pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_pretrained_tutorial_loads_a_saved_pipeline(tmp_path):
    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    spec = importlib.util.spec_from_file_location(
        "capture_pretrained", ROOT / "tutorials/capture_pretrained.py"
    )
    tutorial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tutorial)
    out = tutorial.main(
        [
            str(tmp_path / "flux"),
            "a red mug on the table",
            "--size",
            "16",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "maps"),
        ]
    )
    html = out.read_text()
    assert "plotly" in html and "word=mug" in html and "word=table" in html and "word=red" in html
