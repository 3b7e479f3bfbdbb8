"""The model-scale capture benchmark runs in CI through the code path a GPU runs, at smoke size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gpu_capture_smoke_measures_every_variant_of_every_model(monkeypatch):
    gpu_capture = _load("gpu_capture", monkeypatch)
    written = []
    monkeypatch.setattr(gpu_capture, "write_section", lambda *args: written.append(args))
    body = gpu_capture.main(["--smoke", "--repeats", "1"])
    for title in ("FLUX.1-dev architecture", "SD3.5-large architecture", "Wan 2.1 1.3B architecture"):
        assert title in body
    for variant in ("plain", "eager", "cross", "cross+key_mass", "cross → store"):
        assert body.count(f"| {variant} |") == 3
    assert "≤ 1.05×" in body and "≤ 1.15×" in body and "≤ 1.10×" in body  # FLUX.1-dev's goals
    rows = [line for line in body.splitlines() if line.startswith("| cross → store |")]
    assert all(float(row.split("|")[-2]) > 0 for row in rows)  # MB written to the store
    assert not written  # only a CUDA run writes BENCHMARKS.md
