"""Figures, tables and the explorer label every value with what it is: two samples whose prompts differ."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import attnlens
from attnlens.analysis import (
    find_magnets,
    find_sinks,
    gas_by_token,
    key_groups,
    magnet_words,
    ratio_by_token,
    sinks_by_layer,
    synthetic,
)
from attnlens.errors import LayoutError, MissingVariableError, NotAStoreError, SelectionError
from attnlens.viz.figures import sink_figure

pytest.importorskip("ipywidgets")
pytest.importorskip("anywidget")

TEXT = 8
GRID = (4, 4)
# the end-of-text token stands at position 3 in one prompt and 5 in the other
PROMPTS = ("a red mug", "the big blue cat sits")
EOS = (3, 5)


@pytest.fixture(scope="module")
def two_prompts() -> xr.Dataset:
    """Two samples, different prompts; in layer 1 each prompt's own ``</s>`` is a global sink."""
    labels = [synthetic.prompt_labels(p, TEXT) for p in PROMPTS]
    seq = TEXT + GRID[0] * GRID[1]
    probs = synthetic.random_attention((2, 2, 3, 2), seq, seed=1)
    for sample, eos in enumerate(EOS):
        synthetic.plant_sink(probs, eos, mass=0.6, layers=[1], samples=[sample])
    return synthetic.from_probabilities(probs, labels, grid=GRID)


def test_sinks_are_named_by_the_token_they_are_in_each_prompt(two_prompts):
    table = sinks_by_layer(find_sinks(two_prompts), two_prompts).set_index("layer")
    # grouping by position would call these "</s>" (50%) and "<pad>" (50%): sample 0's labels
    assert table.loc["block.1", "gas"] == "</s> (100%)"
    assert table.loc["block.0", "gas"] == table.loc["block.2", "gas"] == ""
    freq = gas_by_token(find_sinks(two_prompts), two_prompts)
    assert float(freq.sel(layer="block.1", group="</s>")) == 1.0
    assert float(freq.sel(layer="block.1", group="<pad>")) == 0.0


def test_ratio_by_token_averages_each_token_over_its_own_occurrences(two_prompts):
    sinks = find_sinks(two_prompts)
    r = ratio_by_token(sinks, two_prompts).sel(layer="block.1")
    ratio = sinks.ratio.mean("head").sel(layer="block.1")
    eos = [ratio.isel(sample=s, key=k).values for s, k in enumerate(EOS)]  # (step,) each
    assert float(r.sel(group="</s>")) == pytest.approx(float(np.mean(eos)), rel=1e-5)
    # "mug" occurs in sample 0 only: its mean is over sample 0's steps alone
    assert float(r.sel(group="mug")) == pytest.approx(float(ratio.isel(sample=0, key=2).mean()), rel=1e-5)
    assert str(r.group_kind.sel(group="</s>").values) == "special"
    by_kind = ratio_by_token(sinks, two_prompts, by="kind")
    assert set(by_kind.group.values) == {"stop", "content", "special", "pad", "image"}


def test_magnets_are_named_by_their_own_sample_token():
    labels = [synthetic.prompt_labels(p, TEXT) for p in PROMPTS]
    seq = TEXT + GRID[0] * GRID[1]
    probs = synthetic.random_attention((2, 1, 2, 1), seq, seed=2)
    # "the" (position 0 of the second prompt) draws image queries; position 0 of the first is "a"
    synthetic.scale_keys(probs, [0], 6.0, samples=[1], queries=range(TEXT, seq))
    ds = synthetic.from_probabilities(probs, labels, grid=GRID)
    words = magnet_words(find_magnets(ds))
    assert words[["word", "kind", "frequency"]].values.tolist() == [["the", "stop", 1.0]]


def test_grouping_by_position_is_refused_when_prompts_differ(two_prompts):
    with pytest.raises(LayoutError, match="samples 1 hold other tokens"):
        key_groups(two_prompts, "position")
    one = two_prompts.isel(sample=[0])
    assert key_groups(one, "position").values[0, :4].tolist() == ["a@0", "red@1", "mug@2", "</s>@3"]
    with pytest.raises(SelectionError, match="cannot group keys by 'place'"):
        key_groups(two_prompts, "place")


def test_sink_figure_names_tokens_marks_the_threshold_and_the_sinks(two_prompts):
    fig = sink_figure(find_sinks(two_prompts), two_prompts)
    heat, rings = fig.data[0], fig.data[1]
    assert list(heat.x[:4]) == ["a", "red", "mug", "</s>"]
    assert list(heat.x[-2:]) == ["image (mean of 16)", "image (max of 16)"]
    assert len(heat.x) == len(set(heat.x)) == heat.z.shape[1]  # one column per token, each named
    assert "10 = GAS r" in heat.colorbar.ticktext and heat.zmax > 1.0  # log10 10 is on the scale
    assert list(zip(rings.y, rings.x, strict=True)) == [("block.1", "</s>")] and rings.customdata[0] == 1.0
    # the value under "</s>" is the token's own mean ratio, not a position's
    r = ratio_by_token(find_sinks(two_prompts), two_prompts)
    column = list(heat.x).index("</s>")
    np.testing.assert_allclose(10 ** heat.z[:, column], r.sel(group="</s>").values, rtol=1e-5)


# -- the explorer ----------------------------------------------------------------------------------


def _map(ds, sample, step, layer, head, variable, positions):
    """The oracle: the selection read straight from the Dataset, on the (y, x) grid."""
    one = ds[variable].isel(sample=sample, step=step, layer=layer, head=head)
    if variable == "cross":
        values = one.isel(key_text=positions).sum("key_text")
    else:
        values = one.isel(query_text=positions).sum("query_text")
    grid = np.full(GRID, np.nan)
    grid[ds.y.values, ds.x.values] = values.values
    return grid


def test_each_control_changes_the_figure_to_its_slice(two_prompts):
    ds = two_prompts
    ex = attnlens.explore(ds)
    c = ex.controls
    assert c["word"].value == "red (content)"  # the first content word
    c["step"].value = 1
    c["layer"].value = "block.2"
    c["head"].value = "1"
    np.testing.assert_allclose(ex.figure.data[0].z, _map(ds, 0, 1, 2, 1, "cross", [1]), rtol=1e-6)
    c["word"].value = "mug (content)"
    np.testing.assert_allclose(ex.figure.data[0].z, _map(ds, 0, 1, 2, 1, "cross", [2]), rtol=1e-6)
    c["sample"].value = 1  # "mug" is not in the second prompt: the first content word is shown
    assert c["word"].value == "big (content)"
    np.testing.assert_allclose(ex.figure.data[0].z, _map(ds, 1, 1, 2, 1, "cross", [1]), rtol=1e-6)
    c["kind"].value = "text→image"
    np.testing.assert_allclose(ex.figure.data[0].z, _map(ds, 1, 1, 2, 1, "text_to_image", [1]), rtol=1e-6)
    # means over steps, layers and heads are means of the slices
    c["kind"].value = "cross"
    c["step"].value, c["layer"].value, c["head"].value = "mean", "*", "mean"
    mean = np.mean(
        [_map(ds, 1, s, la, h, "cross", [1]) for s in range(2) for la in range(3) for h in range(2)], axis=0
    )
    np.testing.assert_allclose(ex.figure.data[0].z, mean, rtol=1e-5)
    assert "sample 1 · step mean of 2 steps · layer mean of all 3 layers" in ex.figure.layout.title.text


def test_sink_ratio_bars_follow_the_sample_tokens_and_mark_its_sink(two_prompts):
    ds = two_prompts
    ex = attnlens.explore(ds)
    c = ex.controls
    c["kind"].value, c["layer"].value, c["step"].value, c["head"].value = "sink ratio", "block.1", 0, "0"
    for sample, eos in enumerate(EOS):
        c["sample"].value = sample
        bars = {x: y for t in ex.figure.data if t.type == "bar" for x, y in zip(t.x, t.y, strict=True)}
        tokens = ds.token_str.values[sample]
        expected = ds.key_mass.isel(sample=sample, step=0, layer=1, head=0).values[:TEXT] * ds.sizes["key"]
        order = ex.figure.layout.xaxis2.categoryarray
        assert [label.split(": ")[1].split(" [")[0] for label in order] == list(tokens)
        np.testing.assert_allclose([bars[label] for label in order], expected, rtol=1e-5)
        assert order[eos] == f"{eos}: </s> [GAS+magnet]"  # planted for every query: image ones too
        threshold = next(t for t in ex.figure.data if t.name == "GAS threshold r = 10")
        assert list(threshold.y) == [10.0, 10.0]
    grid = np.full(GRID, np.nan)
    alpha = ds.key_mass.isel(sample=1, step=0, layer=1, head=0).values
    grid[ds.y.values, ds.x.values] = alpha[TEXT:] * ds.sizes["key"]
    np.testing.assert_allclose(ex.figure.data[0].z, grid, rtol=1e-5)


def test_explore_reads_a_store_lazily_and_rejects_what_it_cannot_show(two_prompts, tmp_path):
    from attnlens.store import StoreWriter

    writer = StoreWriter(str(tmp_path / "s.zarr"))
    writer.submit(None, lambda: two_prompts)
    writer.close()
    ex = attnlens.explore(str(tmp_path / "s.zarr"))
    assert ex.ds.cross.chunks is not None  # dask-backed: only the chosen slices are read
    ex.controls["layer"].value, ex.controls["step"].value, ex.controls["head"].value = "block.1", 1, "0"
    np.testing.assert_allclose(ex.figure.data[0].z, _map(two_prompts, 0, 1, 1, 0, "cross", [1]), rtol=1e-6)
    with pytest.raises(MissingVariableError, match="explore needs cross, text_to_image or key_mass"):
        attnlens.explore(two_prompts[[]])
    with pytest.raises(NotAStoreError, match="got a int"):
        attnlens.explore(3)
    with pytest.raises(MissingVariableError, match="needs the image and the model"):
        attnlens.explore(two_prompts, "the red mug")


def test_explorer_with_an_expression_shows_refam_heatmap_points_and_mask(two_prompts):
    from attnlens.testing import tiny_shapes_pipeline

    image = np.zeros((40, 50, 3), dtype=np.uint8)
    ex = attnlens.explore(two_prompts, "the red circle", image=image, model=tiny_shapes_pipeline())
    panel = {t.name: t for t in ex.figure.data if t.name and t.name.startswith("RefAM")}
    assert set(panel) == {"RefAM heatmap", "RefAM mask", "RefAM points"}
    np.testing.assert_array_equal(panel["RefAM heatmap"].z, ex.refam.heatmap)  # (H, W) at the image size
    np.testing.assert_array_equal(panel["RefAM mask"].z, ex.refam.mask.astype(float))
    assert list(panel["RefAM points"].x) == list(ex.refam.points[ex.refam.point_labels == 1, 0])
    assert ex.figure.layout.annotations[2].text == "RefAM: 'the red circle'"


def test_explorer_displays_as_a_widget(two_prompts):
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype"  # no static PNG asked for
    bundle = attnlens.explore(two_prompts)._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "image/png" not in bundle
