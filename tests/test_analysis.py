"""Analyses (sinks, magnets, redistribution, ranking, metrics) and the ``sinks`` command.

Known answers come from synthetic captures with planted structure (:mod:`attnlens.analysis.synthetic`):
each detector must find exactly what was planted, and nothing of the decoys planted beside it.
"""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.stats
import torch
import xarray as xr
from dask.callbacks import Callback

import attnlens
from attnlens.analysis import (
    auc,
    binarize,
    find_magnets,
    find_sinks,
    iou,
    localisation_scores,
    magnet_words,
    mass_by_kind,
    pointing_game,
    rank,
    redistribution,
    sink_tokens,
    sinks_by_layer,
    synthetic,
    transport,
)
from attnlens.analysis._common import query_mask
from attnlens.errors import LayoutError, MissingVariableError

PROMPT = "a red mug on the table"  # a red mug on the table </s> <pad> ×5
TEXT, GRID = 12, (8, 8)
N = TEXT + GRID[0] * GRID[1]
SINK = 7  # the first <pad>
SINK_LAYERS = list(range(10, 19))
DEPENDENT = 32  # an image token that a quarter of the queries attend to (layer 3)
ONE_HEAD = 2  # "mug": a sink in head 0 of layer 20 only


@pytest.fixture(scope="module")
def planted():
    """24 layers × 4 heads, 2 samples × 2 steps: a <pad> taking 60 % of all attention in layers 10–18."""
    probs = synthetic.random_attention((2, 2, 24, 4), N, seed=0)
    synthetic.plant_sink(probs, SINK, mass=0.6, layers=SINK_LAYERS)
    synthetic.plant_sink(probs, DEPENDENT, mass=0.9, layers=3, queries=range(0, N, 4))
    synthetic.plant_sink(probs, ONE_HEAD, mass=0.6, layers=20, heads=0)
    norms = 10.0 + 0.5 * np.random.default_rng(1).standard_normal((2, 2, 24, N))
    norms[:, :, SINK_LAYERS, SINK] = 500.0  # massive (and high-norm) where the sink is
    norms[:, :, 5, 30] = 40.0  # high-norm only: 4× the median, below 100
    return synthetic.from_probabilities(
        probs, synthetic.prompt_labels(PROMPT, TEXT), grid=GRID, hidden_norm=norms
    )


def _where(layers_keys: list[tuple[int, int]], shape=(24, N)) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for layer, key in layers_keys:
        out[layer, key] = True
    return out


PLANTED_GAS = _where([(layer, SINK) for layer in SINK_LAYERS])


# -- sinks --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "source"),
    [(None, "full"), (["key_mass", "cross", "text_to_image", "hidden_norm"], "cross and text_to_image")],
)
def test_find_sinks_finds_the_planted_sink_and_no_decoy(planted, variables, source):
    ds = planted if variables is None else planted[variables]
    sinks = find_sinks(ds)
    assert sinks.attrs["query_share_from"] == source
    for s in range(2):
        for t in range(2):
            assert np.array_equal(sinks.gas.isel(sample=s, step=t).values, PLANTED_GAS)
    share = sinks.gas_share.mean(("sample", "step")).values
    np.testing.assert_allclose(share[SINK_LAYERS], 0.6, atol=1e-6)
    assert (np.delete(share, SINK_LAYERS) == 0).all()
    assert (sinks.gas_count.sel(layer=[f"block.{i}" for i in SINK_LAYERS]) == 1).all()
    # the decoys: high r_k but query-dependent (layer 3), or a sink in one head of four (layer 20)
    assert float(sinks.ratio.isel(layer=3, key=DEPENDENT).min()) > 10
    assert float(sinks.query_share.isel(layer=3, key=DEPENDENT).max()) < 0.3
    assert float(sinks.sink_heads.isel(layer=20, key=ONE_HEAD).max()) == 0.25


def test_literature_criteria_side_by_side(planted):
    sinks = find_sinks(planted)
    gu = sinks.gu_heads.isel(sample=0, step=0).values  # share of heads with α > 0.3 (Gu et al.)
    expected = np.zeros((24, N))
    expected[SINK_LAYERS, SINK] = 1.0
    expected[20, ONE_HEAD] = 0.25
    np.testing.assert_array_equal(gu, expected)
    np.testing.assert_array_equal(sinks.gu_sink_heads.isel(sample=0, step=0).values, expected.max(axis=1))
    high = sinks.high_norm.any(("sample", "step")).values  # Darcet et al.
    massive = sinks.massive.any(("sample", "step")).values  # Sun et al. (norm proxy)
    assert np.array_equal(high, PLANTED_GAS | _where([(5, 30)]))
    assert np.array_equal(massive, PLANTED_GAS)


def test_with_key_mass_only_the_gas_criterion_falls_back_to_ratio_and_heads(planted):
    sinks = find_sinks(planted[["key_mass"]])
    assert sinks.attrs["query_share_from"].startswith("none")
    assert bool(sinks.query_share.isnull().all())
    # as documented: the query-dependent decoy cannot be told from a sink without per-query attention
    expected = PLANTED_GAS | _where([(3, DEPENDENT)])
    assert np.array_equal(sinks.gas.any(("sample", "step")).values, expected)


def test_find_sinks_without_sample_or_step_dims_and_lazily(planted):
    one = find_sinks(planted.isel(sample=0, step=1))
    assert one.gas.dims == ("layer", "key")
    assert np.array_equal(one.gas.values, PLANTED_GAS)
    lazy = find_sinks(planted.chunk({"sample": 1, "layer": 6}))
    assert lazy.gas.chunks is not None and lazy.gas_share.chunks is not None
    eager = find_sinks(planted)
    xr.testing.assert_equal(lazy.gas.compute(), eager.gas)
    xr.testing.assert_allclose(lazy.query_share.compute(), eager.query_share)


def test_sink_tables_name_the_token_layers_and_steps(planted):
    sinks = find_sinks(planted)
    rows = sink_tokens(sinks, planted)
    assert len(rows) == 2 * 2 * len(SINK_LAYERS)
    assert set(rows.token) == {"<pad>"} and set(rows.key) == {SINK} and set(rows.kind) == {"pad"}
    assert sorted(set(rows.layer)) == sorted(f"block.{i}" for i in SINK_LAYERS)
    assert set(rows.timestep) == {1000.0, 500.0}
    np.testing.assert_allclose(rows.alpha, 0.6, atol=1e-6)
    table = sinks_by_layer(sinks, planted).set_index("layer")
    for i in range(24):
        row = table.loc[f"block.{i}"]
        assert row.gas == ("<pad> (100%)" if i in SINK_LAYERS else "")
        assert row.top_kind == ("pad" if i in SINK_LAYERS else "image")
    assert table.loc["block.5", "high_norm"] == 1.0 and table.loc["block.12", "massive"] == 1.0
    assert sink_tokens(find_sinks(synthetic.planted(layers=2, heads=1, steps=1, grid=(2, 2)))).empty


# -- magnets ------------------------------------------------------------------------------------


def test_find_magnets_finds_the_planted_magnets_and_nothing_else():
    ds = synthetic.planted(layers=12, samples=2, steps=1, magnets=["the", "<pad>"], magnet_layers=range(4, 9))
    magnets = find_magnets(ds)
    found = magnets.magnet.any(("sample", "step")).values  # (layer, key_text)
    expected = np.zeros((12, TEXT), dtype=bool)
    expected[4:9, 4] = True  # "the"
    expected[4:9, 7:] = True  # the five <pad>
    assert np.array_equal(found, expected)
    words = magnet_words(magnets)
    assert sorted(zip(words.word, words.kind, strict=True)) == [("<pad>", "pad"), ("the", "stop")]
    assert set(words.layers) == {"block.4, block.5, block.6, block.7, block.8"}
    np.testing.assert_allclose(words.frequency, 5 / 12)
    np.testing.assert_allclose(magnets.kind_share.sum("kind"), 1.0, atol=1e-6)
    pad = magnets.kind_share.sel(kind="pad").mean(("sample", "step")).values
    # 5 of 12 tokens are padding; planted, they weigh 4 each: 20 of 6 + 4 + 20 = 30
    np.testing.assert_allclose(pad[4:9], 20 / 30, rtol=0.05)
    np.testing.assert_allclose(np.delete(pad, range(4, 9)), 5 / 12, rtol=0.05)


def test_a_padding_sink_also_acts_as_a_magnet(planted):
    found = find_magnets(planted).magnet.any(("sample", "step")).values
    expected = np.zeros((24, TEXT), dtype=bool)
    expected[SINK_LAYERS, SINK] = True
    assert np.array_equal(found, expected)


# -- redistribution -----------------------------------------------------------------------------


def _redistribution_pair():
    """Before: "a red mug </s> <pad>×4"; after: two magnets "the" appended, taking 0.08 of the mug's
    attention from each background query (outside the mask), nothing else changing."""
    before_labels = synthetic.prompt_labels("a red mug", 8)
    after_labels = synthetic.prompt_labels("a red mug", 8, magnets=["the", "the"])
    n = 8 + 64
    mask = np.zeros(GRID, dtype=bool)
    mask[2:6, 2:6] = True
    inside = 8 + np.flatnonzero(mask.ravel())
    outside = 8 + np.flatnonzero(~mask.ravel())
    before = synthetic.random_attention((1, 1, 3, 2), n, seed=3)
    synthetic.plant_sink(before, 2, mass=0.2, queries=inside)
    synthetic.plant_sink(before, 2, mass=0.1, queries=outside)
    # after: columns a, red, mug, the, the, </s>, <pad>, <pad>, image… from before's a, red, mug, –, –,
    # </s>, <pad>+<pad>, <pad>+<pad>, image…: every destination keeps its mass
    after = np.zeros_like(before)
    after[..., [0, 1, 2]] = before[..., [0, 1, 2]]
    after[..., 5] = before[..., 3]
    after[..., 6] = before[..., 4] + before[..., 5]
    after[..., 7] = before[..., 6] + before[..., 7]
    after[..., 8:] = before[..., 8:]
    rows = np.ix_(range(1), range(1), range(3), range(2), outside)
    moved = after[rows]
    moved[..., 2] -= 0.08
    moved[..., [3, 4]] += 0.04
    after[rows] = moved
    keep = ("cross",)
    return (
        synthetic.from_probabilities(before, before_labels, grid=GRID, keep=keep),
        synthetic.from_probabilities(after, after_labels, grid=GRID, keep=keep),
        mask,
    )


def test_redistribution_measures_the_planted_change():
    before, after, mask = _redistribution_pair()
    result = redistribution(before, after, "mug", mask=mask)

    def entropy(inside: float, outside: float) -> float:
        total = 16 * inside + 48 * outside
        return -(16 * inside * math.log(inside / total) + 48 * outside * math.log(outside / total)) / total

    np.testing.assert_allclose(result.entropy.sel(run="before"), entropy(0.2, 0.1), rtol=1e-5)
    np.testing.assert_allclose(result.entropy.sel(run="after"), entropy(0.2, 0.02), rtol=1e-5)
    np.testing.assert_allclose(result.peak_to_background.sel(run="before"), 2.0, rtol=1e-5)
    np.testing.assert_allclose(result.peak_to_background.sel(run="after"), 10.0, rtol=1e-4)
    np.testing.assert_allclose(result.mass_inside.sel(run="before"), 0.4, rtol=1e-5)
    np.testing.assert_allclose(result.mass_inside.sel(run="after"), 3.2 / 4.16, rtol=1e-5)
    np.testing.assert_allclose(result.change_mass_outside, 0.4 - 3.2 / 4.16, rtol=1e-4)
    assert (result.change_entropy < 0).all()


def test_transport_says_where_the_background_mass_went():
    before, after, mask = _redistribution_pair()
    moved = transport(before, after, mask=mask).change.isel(sample=0, step=0)  # (layer, destination)
    changed = sorted(
        str(d) for d in moved.destination.values if float(abs(moved.sel(destination=d)).max()) > 1e-6
    )
    assert changed == ["content:mug", "magnet:the"]
    np.testing.assert_allclose(moved.sel(destination="content:mug"), -0.08, atol=1e-6)
    np.testing.assert_allclose(moved.sel(destination="magnet:the"), 0.08, atol=1e-6)
    np.testing.assert_allclose(moved.sum("destination"), 0.0, atol=1e-6)
    everywhere = transport(before, after).change.isel(sample=0, step=0)  # all image queries
    np.testing.assert_allclose(everywhere.sel(destination="content:mug"), -0.08 * 48 / 64, atol=1e-6)


# -- ranking and metrics ------------------------------------------------------------------------


def test_ranking_puts_the_localising_head_first_and_the_inverted_one_last():
    prompts, targets = ["a red mug", "the black cat", "a small dog"], ["mug", "cat", "dog"]
    masks = np.zeros((3, *GRID), dtype=bool)
    masks[0, 1:4, 1:5] = True
    masks[1, 4:8, 0:3] = True
    masks[2, 2:6, 5:8] = True
    n = 8 + 64
    probs = synthetic.random_attention((3, 1, 3, 2), n, seed=5)
    for s in range(3):
        inside = 8 + np.flatnonzero(masks[s].ravel())
        outside = 8 + np.flatnonzero(~masks[s].ravel())
        for layer, (a, b) in ((1, (0.3, 0.01)), (2, (0.01, 0.3))):  # localising, inverted
            synthetic.plant_sink(probs, 2, mass=a, samples=s, layers=layer, heads=0, queries=inside)
            synthetic.plant_sink(probs, 2, mass=b, samples=s, layers=layer, heads=0, queries=outside)
    labels = [synthetic.prompt_labels(p, 8) for p in prompts]
    ds = synthetic.from_probabilities(probs, labels, grid=GRID, keep=("cross",))
    scores = localisation_scores(ds, masks, targets)
    best = scores.sel(layer="block.1", head=0)
    assert (
        float(best.iou.min()) == 1.0
        and float(best.pointing_game.min()) == 1.0
        and float(best.auc.min()) == 1.0
    )
    worst = scores.sel(layer="block.2", head=0)
    assert (
        float(worst.iou.max()) == 0.0
        and float(worst.pointing_game.max()) == 0.0
        and float(worst.auc.max()) == 0.0
    )
    for metric in ("iou", "pointing_game", "auc"):
        table = rank(scores, by=("layer", "head"), metric=metric)
        assert (table.layer[0], table["head"][0]) == ("block.1", 0)
        assert (table.layer.iloc[-1], table["head"].iloc[-1]) == ("block.2", 0)
        assert list(table["rank"]) == [1, 2, 3, 4, 5, 6] and (table.n == 3).all()
    assert rank(scores, by="layer", metric="auc").layer[0] == "block.1"
    assert list(rank(scores, by="timestep").timestep) == [1000.0]  # steps are ranked by their coordinate
    with pytest.raises(MissingVariableError, match="choose from iou"):
        rank(scores, metric="dice")


def test_metrics_agree_with_independent_oracles():
    rng = np.random.default_rng(7)
    heat = xr.DataArray(rng.random((5, 6, 7)).round(1), dims=("sample", "y", "x"))  # rounded: ties
    truth = xr.DataArray(rng.random((5, 6, 7)) > 0.6, dims=("sample", "y", "x"))
    pred = binarize(heat, 0.5, dims=("y", "x"))
    scores = {
        "iou": iou(pred, truth, dims=("y", "x")),
        "pg": pointing_game(heat, truth, dims=("y", "x")),
        "auc": auc(heat, truth, dims=("y", "x")),
    }
    for s in range(5):
        h, t = heat.values[s].ravel(), truth.values[s].ravel()
        p = (h - h.min()) >= 0.5 * (h.max() - h.min())
        assert float(scores["iou"][s]) == pytest.approx((p & t).sum() / (p | t).sum())
        assert float(scores["pg"][s]) == float(t[h == h.max()].any())
        u = scipy.stats.mannwhitneyu(h[t], h[~t]).statistic / (t.sum() * (~t).sum())
        assert float(scores["auc"][s]) == pytest.approx(u)
    empty = xr.zeros_like(truth, dtype=bool)
    assert float(iou(empty, empty, dims=("y", "x"))[0]) == 1.0
    assert bool(auc(heat, empty, dims=("y", "x")).isnull().all())
    assert bool(pointing_game(heat, empty, dims=("y", "x")).isnull().all())


def test_masks_at_pixel_resolution_are_taken_to_the_token_grid(planted):
    tokens = np.zeros(GRID, dtype=bool)
    tokens[1:3, 2:7] = True
    pixels = np.kron(tokens, np.ones((4, 4), dtype=bool))
    expected = tokens.ravel()
    assert np.array_equal(query_mask(planted, tokens).values, expected)
    assert np.array_equal(query_mask(planted, pixels).values, expected)
    with pytest.raises(LayoutError, match="does not tile"):
        query_mask(planted, np.zeros((9, 8), dtype=bool))


def test_missing_inputs_name_what_is_needed(planted):
    with pytest.raises(MissingVariableError, match="find_sinks needs key_mass"):
        find_sinks(planted[["cross"]])
    with pytest.raises(MissingVariableError, match="find_magnets needs cross"):
        find_magnets(planted[["key_mass"]])
    with pytest.raises(
        MissingVariableError, match="not a word of sample 0; its words: a, mug, on, red, table"
    ):
        localisation_scores(planted, np.ones(GRID, dtype=bool), "cat")
    assert issubclass(MissingVariableError, attnlens.AttnlensError)


# -- a real model -------------------------------------------------------------------------------


def test_token_kinds_taking_the_most_mass_per_layer_of_a_tiny_flux(flux_pipe):
    with attnlens.capture(flux_pipe, keep=("key_mass", "cross", "hidden_norm")) as cap:
        flux_pipe(
            "a red mug on the table",
            height=16,
            width=16,
            num_inference_steps=2,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
    ds = cap.result
    kinds = mass_by_kind(ds).mean(("sample", "step"))  # (layer, kind)
    print("\nshare of incoming attention by token kind (tiny random FLUX; not a trained model):")
    print(kinds.to_pandas().round(3).to_string())
    sinks = find_sinks(ds)
    print(sinks_by_layer(sinks, ds).to_string())
    # only what holds for any weights: shares partition the mass, r averages to 1, kinds are the labels'
    np.testing.assert_allclose(kinds.sum("kind"), 1.0, atol=1e-5)
    assert set(kinds.kind.values) == {"content", "stop", "special", "pad", "image"}
    np.testing.assert_allclose(sinks.ratio.mean("key"), 1.0, atol=1e-4)
    assert ((sinks.gas_share >= 0) & (sinks.gas_share <= 1)).all()
    assert sinks.attrs["query_share_from"] == "cross"
    np.testing.assert_allclose(find_magnets(ds).kind_share.sum("kind"), 1.0, atol=1e-5)


# -- the command line ---------------------------------------------------------------------------


def test_sinks_command_on_a_store(planted, tmp_path, capsys, monkeypatch):
    from rich.console import Console

    from attnlens import cli
    from attnlens.store import StoreWriter

    monkeypatch.setattr(cli, "console", Console(width=200))  # one table row per line
    main = cli.main

    store = tmp_path / "planted.zarr"
    writer = StoreWriter(str(store))
    writer.submit(None, lambda: planted)
    writer.close()
    figure = tmp_path / "sinks.html"
    assert main(["sinks", str(store), "--out", str(figure)]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "block." in line]
    assert len(lines) == 24
    for line in lines:
        layer = int(line.split("block.")[1].split()[0])
        assert ("<pad> (100%)" in line) == (layer in SINK_LAYERS)
    assert "query independence measured from: full" in printed
    html = figure.read_text()
    assert "plotly" in html and "sink ratio" in html
    assert main(["sinks", str(tmp_path / "missing.zarr")]) == 2
    assert "error:" in capsys.readouterr().out


# -- out of core --------------------------------------------------------------------------------


class _HeldMemory(Callback):
    """Largest total size of the results the synchronous scheduler holds at once, and of one result."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = self.largest = self.tasks = 0

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        self.tasks += 1
        self.largest = max(self.largest, getattr(result, "nbytes", 0))
        self.peak = max(self.peak, sum(getattr(v, "nbytes", 0) for v in state["cache"].values()))


def test_all_analyses_run_out_of_core_on_a_store_larger_than_the_memory_budget():
    budget = 500 * 2**20
    samples, steps, layers, heads, grid, text = 84, 2, 24, 4, (32, 32), 32
    n_image = grid[0] * grid[1]
    seq = text + n_image
    labels = synthetic.prompt_labels(PROMPT, text)
    shape = (samples, steps, layers, heads, seq, seq)  # a view of one zero: only the coordinates are built
    norms = np.full((samples, steps, layers, seq), 10.0, dtype=np.float32)
    template = synthetic.from_probabilities(
        np.broadcast_to(np.float32(0), shape), labels, grid=grid, keep=(), hidden_norm=norms
    )
    # cheap lazy data: every chunk is a broadcast view of one (layer, query, key_text) pattern
    weight = ((np.arange(n_image) % 7 + 1) / 7).astype(np.float32)[:, None]
    cross_pattern = np.broadcast_to(np.float32(0.6 / seq) * weight, (layers, n_image, text)).copy()
    cross_pattern[SINK_LAYERS, :, SINK] = 0.6
    mass_pattern = np.full((layers, seq), 1.0 / seq, dtype=np.float32)
    mass_pattern[SINK_LAYERS] = 0.4 / (seq - 1)
    mass_pattern[SINK_LAYERS, SINK] = 0.6

    def lazy(pattern: np.ndarray, tail: tuple[int, ...]) -> da.Array:
        def block(block_info=None):
            info = block_info[None]
            start, stop = info["array-location"][2]
            return np.broadcast_to(pattern[None, None, start:stop, None], info["chunk-shape"])

        chunks = ((1,) * samples, (steps,), (layers,), (heads,), *((n,) for n in tail))
        return da.map_blocks(block, chunks=chunks, dtype=np.float32)

    ds = template.assign(
        cross=(
            ("sample", "step", "layer", "head", "query", "key_text"),
            lazy(cross_pattern, (n_image, text)),
        ),
        key_mass=(("sample", "step", "layer", "head", "key"), lazy(mass_pattern, (seq,))),
        hidden_norm=template.hidden_norm.chunk({"sample": 1}),
    )
    assert ds.nbytes > 2**31 > 4 * budget
    assert max(v.data.nbytes / v.data.npartitions for v in ds.data_vars.values()) < budget / 16
    assert ds.cross.data.npartitions == samples

    mask = np.zeros(grid, dtype=bool)
    mask[8:16, 8:16] = True
    sinks, magnets = find_sinks(ds), find_magnets(ds)
    scores = localisation_scores(ds, mask, "mug")
    moved = redistribution(ds, ds, "mug", mask=mask)
    where = transport(ds, ds, mask=mask)
    results = [sinks, magnets, scores, moved, where]
    assert all(
        var.chunks is not None for r in results for var in r.data_vars.values()
    )  # nothing computed yet
    small = {
        "gas": sinks.gas.any(("sample", "step")),
        "gas_share": sinks.gas_share.mean(("sample", "step")),
        "magnet": magnets.magnet.any(("sample", "step")),
        "auc": scores.auc.mean(("sample", "step", "head")),
        "entropy": moved.change_entropy,
        "transport": where.change,
    }
    held = _HeldMemory()
    with dask.config.set(scheduler="synchronous"), held:
        (out,) = dask.compute(small)
    assert held.peak < budget and held.largest < budget / 16
    assert held.tasks > 4 * samples
    assert np.array_equal(out["gas"].values, _where([(i, SINK) for i in SINK_LAYERS], (layers, seq)))
    np.testing.assert_allclose(out["gas_share"].values[SINK_LAYERS], 0.6, atol=1e-5)
    magnet = np.zeros((layers, text), dtype=bool)
    magnet[SINK_LAYERS, SINK] = True
    assert np.array_equal(out["magnet"].values, magnet)
    assert out["auc"].shape == (layers,) and not out["auc"].isnull().any()
    assert (out["entropy"] == 0).all() and (out["transport"] == 0).all()  # a capture against itself


def test_indicators_of_lazy_labels_stay_lazy_one_sample_at_a_time():
    from attnlens.analysis._common import one_hot

    ds = synthetic.planted(samples=3)
    lazy = ds.assign_coords(key_kind=ds.key_kind.chunk({"sample": 1}))
    hot = one_hot(lazy.key_kind, "kind")
    assert isinstance(hot.data, da.Array) and hot.data.chunks[0] == (1, 1, 1)
    xr.testing.assert_equal(hot.compute(), one_hot(ds.key_kind, "kind"))
    xr.testing.assert_allclose(find_sinks(lazy.chunk({"sample": 1})).compute(), find_sinks(ds))
