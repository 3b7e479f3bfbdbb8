"""The main job end to end (capture → store → sinks → segmentation → report), the HTML report,
the model card, and the `attnlens segment` command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from PIL import Image

from attnlens import demo
from attnlens.cli import main
from attnlens.datasets import shapesref
from attnlens.refam.benchmark import VARIANTS, evaluate, summarise, video_scores
from attnlens.store import open_store
from attnlens.testing import tiny_shapes_config
from attnlens.viz.report import Report
from attnlens.zoo import card
from attnlens.zoo.shapes import ShapesPipeline
from attnlens.zoo.train import TrainConfig, train

TINY = tiny_shapes_config()


@pytest.fixture(scope="module")
def pipe():
    return ShapesPipeline.untrained(TINY)


def test_report_is_one_self_contained_file(tmp_path):
    report = Report("a <report>")
    report.heading("numbers")
    report.table(pd.DataFrame({"method": ["RefAM"], "mIoU": [0.51234]}))
    report.figure(go.Figure(go.Scatter(y=[1, 2])))
    report.figure(go.Figure(go.Bar(y=[3])))
    report.images([(np.zeros((8, 8, 3), np.uint8), "black"), (np.ones((8, 8)), "white")])
    html = report.save(tmp_path / "r.html").read_text()
    assert "a &lt;report&gt;" in html and "0.512" in html
    assert html.count('<img class="px" width="128" src="data:image/png;base64,') == 2
    # plotly.js is inlined once, never fetched from a CDN
    assert html.count("plotly.js v") == 1 and '<script src="http' not in html


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, pipe):
    return demo.run(tmp_path_factory.mktemp("demo"), model=pipe, scenes=2, steps=2, progress=False)


def test_demo_captures_finds_sinks_segments_and_reports(tmp_path, pipe, demo_run):
    result = demo_run
    ds = open_store(result.store)
    assert list(ds.sample_id.values) == ["test-0", "test-1"] and {"cross", "key_mass"} <= set(ds.data_vars)
    assert list(result.token_mass.layer) == ["double.0", "single.0"]
    shares = result.token_mass.drop(columns=["layer", "top text token", "its r"]).sum(axis=1)
    np.testing.assert_allclose(shares, 1.0, atol=1e-5)
    assert set(result.sinks.layer) == {"double.0", "single.0"}
    table = result.segmentation.set_index("variant")
    n = sum(len(s.expressions) for s in shapesref.split("test", n=2))
    assert (table.n == n).all()
    assert table.loc["whole image", "mIoU"] < table.loc["union of objects", "mIoU"] <= 1
    html = result.report.read_text()
    assert "Attention sinks" in html and "RefAM mask" in html
    assert "<dt>gas_share</dt>" in html  # every table says what its columns mean
    again = demo.run(tmp_path, model=pipe, scenes=1, steps=2, progress=False)  # a rerun replaces the store
    assert list(open_store(again.store).sample_id.values) == ["test-0"]


def test_benchmark_scores_variants_and_baselines(pipe):
    pairs = list(shapesref.expressions("test", 4))
    rows = evaluate(pipe, pairs, {k: VARIANTS[k] for k in ("RefAM", "attention only")}, progress=False)
    assert len(rows) == 4 * (2 + len(shapesref.BASELINES))
    table = summarise(rows)
    whole = table[(table.variant == "whole image") & (table.subset == "all")].iloc[0]
    areas = [s.masks[e.target].mean() for s, e in pairs]
    assert whole.mIoU == pytest.approx(np.mean(areas))  # the whole image's IoU is the target's area
    assert table[table.variant == "colour lookup"].pointing.isna().all()
    refam = rows[rows.variant == "RefAM"]
    assert refam.iou.between(0, 1).all() and refam.pointing.isin([0.0, 1.0]).all()


def test_video_benchmark_scores_j_and_f_frame_by_frame(pipe):
    pairs = list(shapesref.expressions("test", 2, video=True))
    table = video_scores(pipe, pairs, progress=False).set_index("variant")
    assert list(table.index[:3]) == ["RefAM", "attention only", "attention only, head noun"]
    assert (table.n == 2).all()
    assert set(shapesref.BASELINES) <= set(table.index)
    assert table["J&F"].between(0, 1).all()
    np.testing.assert_allclose(table["J&F"], (table.J + table.F) / 2)
    # the whole image scores J = the target's mean area over the frames
    areas = [v.masks[:, e.target].mean() for v, e in pairs]
    assert table.loc["whole image", "J"] == pytest.approx(np.mean(areas))


def test_segment_command_writes_a_mask_at_the_input_size(tmp_path, saved, capsys):
    scene = next(shapesref.split("test", n=1))
    Image.fromarray(scene.image).resize((90, 70)).save(tmp_path / "scene.png")
    args = ["segment", str(tmp_path / "scene.png"), scene.expressions[0].text, "--model", saved]
    assert main([*args, "--out", str(tmp_path / "mask.png"), "--heatmap", str(tmp_path / "heat.png")]) == 0
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (70, 90) and set(np.unique(mask)) <= {0, 255} and mask.any()
    assert np.asarray(Image.open(tmp_path / "heat.png")).shape == (70, 90)
    assert "target words" in capsys.readouterr().out


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pipe):
    folder = tmp_path_factory.mktemp("model")
    pipe.save(folder)
    return str(folder)


@pytest.mark.parametrize(
    ("image", "expression", "model", "message"),
    [
        ("missing.png", "the red circle", None, "no such file"),
        ("black.png", "on the left", None, "no noun"),
        ("black.png", "the red circle", "no-such-model", "neither an embedded model"),
    ],
)
def test_segment_command_reports_bad_input(tmp_path, saved, image, expression, model, message, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "black.png")
    argv = [
        "segment",
        str(tmp_path / image),
        expression,
        "--model",
        model or saved,
        "--out",
        str(tmp_path / "m.png"),
    ]
    assert main(argv) == 2
    assert message in capsys.readouterr().out.lower()
    assert not (tmp_path / "m.png").exists()


def test_model_card_reports_bars_and_claims_that_can_be_rechecked(tmp_path):
    tiny = tiny_shapes_config("v2")
    config = TrainConfig(steps=2, batch=4, checkpoint_every=2, warmup=2, world="v2", snapshot_every=0)
    trained = train(tmp_path, tiny, config, progress=False)
    m = card.measure(
        trained, n_val=6, n_test=8, n_heldout=4, n_video=2, prompts=4, sink_scenes=2, claim_subset=10,
        seeds=(0, 1),
    )  # fmt: skip
    assert set(m.options) >= set(card.OPTION_GRID)  # every option was chosen on val
    assert set(m.selection.option) == set(card.OPTION_GRID) and m.selection.chosen.sum() == len(
        card.OPTION_GRID
    )
    assert set(m.test.variant) >= {"RefAM", "attention only", "union of objects", "colour lookup"}
    assert (m.test.spread >= 0).all() and set(m.heldout.variant) >= {"RefAM", "colour lookup"}
    bars = card.bars(m)
    assert list(bars.level) == ["must"] * 4 + ["aim"] * 4 + ["finding"] and bars.met.dtype == bool
    # two steps of training neither draw nor beat the union of objects
    assert not bars.met[:3].any() and bars.bar[2].startswith("RefAM mIoU above the union")
    if m.options["gas"] == "none":  # then "no GAS handling" changes no mask: it is no ablation
        assert "weakest: no GAS handling;" not in bars.required[7] and "left out" in bars.required[7]
    text = card.write_card(tmp_path, "tiny", m, curves={"words": pd.DataFrame({"step": [2]})}).read_text()
    assert set(m.video.variant) >= {"RefAM", "union of objects"} and m.video["J&F"].between(0, 1).all()
    loads = f"`attnlens.zoo.ShapesPipeline.load({str(tmp_path)!r})`"  # not shipped: loaded from its folder
    for heading in ("## Bars", "Not met:", "colour lookup", "frame by frame", "Learning curve: words", loads):
        assert heading in text
    assert json.loads((tmp_path / "refam.json").read_text()) == m.options
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert claims["subset"] == 10
    # the saved weights, with the options saved beside them, reproduce the claimed figures
    again = card.claims(ShapesPipeline.load(tmp_path), n=10)
    for name, value in claims["figures"].items():
        assert again[name] == pytest.approx(value, abs=claims["tolerance"])


@pytest.mark.parametrize("width", [1280, 800])
def test_demo_report_renders_in_chromium(demo_run, width):
    import importlib.util
    from pathlib import Path

    pytest.importorskip("playwright", reason="Playwright drives the browser (the dev extra installs it)")
    path = Path(__file__).parent / "browser.py"
    spec = importlib.util.spec_from_file_location("browser", path)
    browser = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(browser)
    if browser.chromium() is None:
        pytest.skip("no chromium: `make browser` installs Debian's chromium")
    shot = path.parent.parent / "build" / "screenshots" / f"demo_report_{width}.png"
    page = browser.open_page(demo_run.report, shot, plots=1, width=width)
    assert page.errors == []
    assert page.plots == 1  # the sink figure
    n = sum(len(s.expressions) for s in shapesref.split("test", n=2))
    assert page.images == 2 + 4 * min(12, n)  # the drawings, then image, heatmap, mask, truth per row
    assert page.scroll_width <= width  # wide tables scroll inside their box, not the page
