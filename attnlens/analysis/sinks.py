"""Attention sinks: incoming mass, sink ratio, global attention sinks and the literature criteria.

Definitions (DESIGN.md §6), for a key ``k`` of a sequence of ``N`` tokens in one head of one
layer at one step:

- **incoming mass** ``α_k = mean_q P[q, k]`` (the ``key_mass`` of a capture; it sums to 1 over keys);
- **sink ratio** ``r_k = N · α_k`` (1 = what uniform attention would give);
- **query share** ``s_k``: the share of queries that give ``k`` at least ``query_floor · α_k``
  (half its mean, by default): near 1 when every query attends to ``k`` alike, small when a few
  queries account for its mass;
- **global attention sink (GAS)** of a layer: a key with ``r_k ≥ min_ratio`` and
  ``s_k ≥ min_query_share`` in at least ``head_share`` of the layer's heads; its **share of
  total attention** is its ``α_k`` averaged over heads, summed over the layer's GAS keys.

Query independence needs the attention of individual queries, so ``s_k`` is measured from
``full`` when present (all queries), else from ``cross`` (image queries → text keys) and
``text_to_image`` (text queries → image keys). Where neither covers a key, and in a Dataset
holding only ``key_mass``, ``s_k`` is NaN and **the GAS criterion falls back to ``r_k`` and the
head count alone**; ``attrs["query_share_from"]`` says what was used. (``α_k`` itself bounds
the share from below only weakly: ``s_k ≥ α_k/2``.)

Beside it, the criteria of the literature:

- **Gu et al. (2024)**, "When Attention Sink Emerges in Language Models: An Empirical View"
  (arXiv:2410.10781): a head has a sink on ``k`` when ``α_k > ε`` (``ε = 0.3``); reported as the
  share of a layer's heads in which ``k`` is such a sink (their metric averages it over layers);
- **Darcet et al. (2023)**, "Vision Transformers Need Registers" (arXiv:2309.16588): high-norm
  outlier tokens, here a hidden-state norm at least ``norm_factor`` times the layer's median
  token norm (they cut a bimodal norm histogram at ~150 against a bulk below ~100);
- **Sun et al. (2024)**, "Massive Activations in Large Language Models" (arXiv:2402.17762):
  activations above 100 in magnitude and ~1000× the median. A capture keeps the L2 norm of
  each token, not its largest activation; since ``‖h‖ ≥ max|h_i|``, the proxy flags tokens with
  ``‖h‖ ≥ massive_abs`` and ``‖h‖ ≥ massive_factor ×`` the median norm, a necessary condition.

>>> from attnlens.analysis import synthetic, find_sinks
>>> ds = synthetic.planted(layers=6, heads=2, steps=1, grid=(4, 4), sink=12, sink_layers=[3, 4])
>>> sinks = find_sinks(ds)
>>> sinks.gas.any(("sample", "step", "key")).values.tolist()
[False, False, False, True, True, False]
>>> round(float(sinks.gas_share.sel(layer="block.3").squeeze()), 3)
0.6
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ._common import (
    group_mean,
    image_positions,
    key_groups,
    key_labels,
    mean_heads,
    one_hot,
    require,
    text_positions,
)

__all__ = [
    "find_sinks",
    "gas_by_token",
    "mass_by_kind",
    "plot_sinks",
    "ratio_by_token",
    "sink_tokens",
    "sinks_by_layer",
]


def _incoming_mass(ds: xr.Dataset, analysis: str) -> xr.DataArray:
    """``α_k`` ``(…, head, key)``: ``key_mass``, or the mean over queries of ``full``."""
    if "full" in ds and "key_mass" not in ds:
        alpha = ds["full"].mean("query_all").rename("key_mass")
    else:
        require(ds, "key_mass", analysis=analysis)
        alpha = ds["key_mass"]
    # a Dataset already averaged over heads counts as one head
    return alpha if "head" in alpha.dims else alpha.expand_dims(head=["mean"], axis=-2)


def _query_share(ds: xr.Dataset, alpha: xr.DataArray, floor: float) -> tuple[xr.DataArray | None, str]:
    """Share of queries giving each key at least ``floor`` × its mean weight, over ``key`` like ``alpha``."""

    def share(probs: xr.DataArray, query_dim: str) -> xr.DataArray:
        # skipna=False: several times faster, and a layer that does not cover a key (NaN) stays unmeasured
        return (probs >= floor * probs.mean(query_dim, skipna=False)).mean(query_dim)

    if "full" in ds:
        return share(ds["full"].reset_coords(drop=True), "query_all"), "full"
    template = alpha.reset_coords(drop=True)
    pieces, used = [], []
    for var, query_dim, key_dim, positions in (
        ("cross", "query", "key_text", text_positions(ds)),
        ("text_to_image", "query_text", "key_image", image_positions(ds)),
    ):
        if var in ds:
            piece = share(ds[var].reset_coords(drop=True), query_dim).rename({key_dim: "key"})
            pieces.append(piece.assign_coords(key=positions))
            used.append(var)
        else:  # keys this Dataset cannot judge: NaN, built lazily like the rest
            pieces.append(xr.full_like(template.isel(key=positions), np.nan, dtype=np.float32))
    if not used:
        return None, "none (only key_mass: GAS judged on r_k and heads alone)"
    joined = xr.concat(pieces, dim="key").transpose(*template.dims)
    if not joined.indexes["key"].is_monotonic_increasing:
        joined = joined.sortby("key")
    if joined.chunks:  # text and image pieces become one chunk along key, as alpha has
        joined = joined.chunk({"key": -1})
    return joined, " and ".join(used)


def find_sinks(
    ds: xr.Dataset,
    *,
    min_ratio: float = 10.0,
    min_query_share: float = 0.8,
    query_floor: float = 0.5,
    head_share: float = 0.5,
    epsilon: float = 0.3,
    norm_factor: float = 3.0,
    massive_abs: float = 100.0,
    massive_factor: float = 10.0,
) -> xr.Dataset:
    """Incoming mass, sink ratio and global attention sinks (GAS) per layer, with the literature criteria.

    Args:
        ds: a capture or store holding ``key_mass`` or ``full`` (optionally ``cross``,
            ``text_to_image``, ``hidden_norm``); ``sample`` and ``step`` may be absent.
        min_ratio: smallest sink ratio ``r_k`` of a sink (10: ten times uniform).
        min_query_share: smallest query share ``s_k`` of a query-independent key (0.8).
        query_floor: a query "gives ``k`` similar weight" when ``P[q, k] ≥ query_floor · α_k`` (0.5).
        head_share: a GAS is a sink in at least this share of the layer's heads (0.5).
        epsilon: Gu et al.'s threshold on ``α_k`` (0.3).
        norm_factor: Darcet et al.'s high-norm threshold, times the median token norm (3).
        massive_abs: Sun et al.'s magnitude threshold, applied to the norm (100).
        massive_factor: massive-activation proxy threshold, times the median token norm (10).

    Returns:
        A Dataset, lazy when ``ds`` is (``…`` = ``sample, step`` where present), of ``alpha``,
        ``ratio``, ``query_share`` and ``sink`` over ``(…, layer, head, key)``; ``sink_heads``
        (share of heads where ``k`` is a sink), ``gas`` (bool) and ``gu_heads`` (share of heads
        with ``α_k > ε``) over ``(…, layer, key)``; ``gas_share`` (share of total attention the
        layer's GAS take), ``gas_count`` and ``gu_sink_heads`` (share of heads with any key
        above ``ε``) over ``(…, layer)``; with ``hidden_norm``, ``norm_ratio``, ``high_norm``
        and ``massive`` over ``(…, layer, key)``. The coordinates of ``ds`` (``key_kind``,
        ``timestep``, ``layer_kind``, …) are kept; thresholds and the source of
        ``query_share`` are in ``attrs``.
    """
    alpha = _incoming_mass(ds, "find_sinks")
    n = ds.sizes["key"]
    ratio = alpha * n
    share, source = _query_share(ds, alpha, query_floor)
    if share is None:
        share = xr.full_like(alpha, np.nan, dtype=np.float32).reset_coords(drop=True)
    independent = (share >= min_query_share) | share.isnull()
    sink = (ratio >= min_ratio) & independent
    sink_heads = sink.mean("head")
    gas = sink_heads >= head_share
    mean_alpha = alpha.mean("head")
    above = alpha > epsilon
    out = xr.Dataset(
        {
            "alpha": alpha,
            "ratio": ratio,
            "query_share": share,
            "sink": sink,
            "sink_heads": sink_heads,
            "gas": gas,
            "gu_heads": above.mean("head"),
            "gas_share": (mean_alpha * gas).sum("key"),
            "gas_count": gas.sum("key"),
            "gu_sink_heads": above.any("key").mean("head"),
        }
    )
    if "hidden_norm" in ds:
        norm = ds["hidden_norm"]
        median = norm.chunk({"key": -1}).median("key") if norm.chunks else norm.median("key")
        norm_ratio = norm / median
        out["norm_ratio"] = norm_ratio
        out["high_norm"] = norm_ratio >= norm_factor
        out["massive"] = (norm >= massive_abs) & (norm_ratio >= massive_factor)
    out.attrs = {
        "min_ratio": min_ratio,
        "min_query_share": min_query_share,
        "query_floor": query_floor,
        "head_share": head_share,
        "epsilon": epsilon,
        "norm_factor": norm_factor,
        "massive_abs": massive_abs,
        "massive_factor": massive_factor,
        "query_share_from": source,
    }
    return out


def mass_by_kind(ds: xr.Dataset) -> xr.DataArray:
    """Share of incoming attention that each token kind takes, ``(…, layer, kind)``, mean over heads.

    Kinds are those of ``key_kind`` (``content``, ``stop``, ``pad``, ``special``, ``magnet``,
    ``image``, …); the shares sum to 1 over ``kind``.

    >>> from attnlens.analysis import synthetic
    >>> ds = synthetic.planted(layers=2, heads=1, steps=1, grid=(2, 2), text_len=8)
    >>> mass_by_kind(ds).sum("kind").round(6).values.ravel().tolist()
    [1.0, 1.0]
    """
    alpha = _incoming_mass(ds, "mass_by_kind")
    return xr.dot(
        mean_heads(alpha).reset_coords(drop=True), one_hot(ds["key_kind"], "kind"), dim="key"
    ).rename("mass_share")


def sink_tokens(sinks: xr.Dataset, ds: xr.Dataset | None = None) -> pd.DataFrame:
    """One row per GAS found: where (sample, step, layer) and which token, with its statistics.

    Args:
        sinks: the result of :func:`find_sinks`.
        ds: the analysed Dataset, for token strings (optional: ``key_kind`` alone otherwise).

    Returns:
        columns ``sample, step, timestep, layer, key, kind, token, ratio, alpha, sink_heads``
        (``ratio`` and ``alpha`` averaged over heads); computes only the small ``(…, layer, key)``
        arrays.
    """
    small = xr.Dataset(
        {
            "gas": sinks["gas"],
            "ratio": sinks["ratio"].mean("head"),
            "alpha": sinks["alpha"].mean("head"),
            "sink_heads": sinks["sink_heads"],
        }
    ).compute()
    flags = small["gas"].values
    columns = ["sample", "step", "timestep", "layer", "key", "kind", "token", "ratio", "alpha", "sink_heads"]
    if not flags.any():
        return pd.DataFrame(columns=columns)
    labels = key_labels(ds if ds is not None else sinks)
    kinds = sinks["key_kind"]
    dims = small["gas"].dims
    rows = []
    for index in zip(*np.nonzero(flags), strict=True):
        at = dict(zip(dims, index, strict=True))
        where = {d: at[d] for d in labels.dims if d in at}
        rows.append(
            {
                "sample": int(small["sample"].values[at["sample"]]) if "sample" in at else None,
                "step": int(small["step"].values[at["step"]]) if "step" in at else None,
                "timestep": float(small["timestep"].values[at["step"]])
                if "timestep" in small.coords
                else None,
                "layer": str(small["layer"].values[at["layer"]]),
                "key": int(small["key"].values[at["key"]]),
                "kind": str(kinds.isel({d: at[d] for d in kinds.dims}).values),
                "token": str(labels.isel(where).values),
                "ratio": float(small["ratio"].values[index]),
                "alpha": float(small["alpha"].values[index]),
                "sink_heads": float(small["sink_heads"].values[index]),
            }
        )
    return pd.DataFrame(rows, columns=columns)


def ratio_by_token(sinks: xr.Dataset, ds: xr.Dataset | None = None, *, by: str = "token") -> xr.DataArray:
    """Sink ratio ``r`` of each kind of token per layer: ``(layer, group)``, mean over heads and occurrences.

    Keys are grouped by what they are (:func:`~attnlens.analysis._common.key_groups`: token
    string, word, kind, or position where every sample has the same tokens), then ``r`` is
    averaged over every occurrence of the group in every sample and step, so that "[EOS]" is
    the mean over each prompt's own [EOS], wherever it stands. The coordinate ``group_kind``
    holds each group's token kind (the most frequent one).

    >>> from attnlens.analysis import synthetic, find_sinks
    >>> ds = synthetic.planted(layers=2, heads=1, steps=1, grid=(4, 4), sink=8, sink_layers=[1])
    >>> r = ratio_by_token(find_sinks(ds), ds)
    >>> r.dims, [str(g) for g in r.group.values[:8]]
    (('layer', 'group'), ['a', 'red', 'mug', 'on', 'the', 'table', '</s>', '<pad>'])
    >>> round(float(r.sel(layer="block.1", group="<pad>")), 2)  # one sink (16.8) among five <pad>
    3.68
    """
    source = ds if ds is not None else sinks
    groups = key_groups(source, by)
    ratio = sinks["ratio"].mean("head")
    out = group_mean(ratio, groups, over=[d for d in ("sample", "step") if d in ratio.dims])
    kinds = pd.DataFrame(
        {"group": np.asarray(groups.values).ravel(), "kind": np.asarray(sinks["key_kind"].values).ravel()}
    )
    kind = kinds.groupby("group", sort=False)["kind"].agg(lambda k: k.value_counts().index[0])
    return out.assign_coords(group_kind=("group", kind.reindex(out["group"].values).to_numpy().astype(str)))


def gas_by_token(sinks: xr.Dataset, ds: xr.Dataset | None = None, *, by: str = "token") -> xr.DataArray:
    """How often each kind of token is a global attention sink, per layer: ``(layer, group)`` in ``[0, 1]``.

    The share of (sample, step) pairs, among the samples whose prompt holds the token, in which
    one of its occurrences is a GAS; keys grouped as in :func:`ratio_by_token`. Lazy when
    ``sinks`` is.

    >>> from attnlens.analysis import synthetic, find_sinks
    >>> ds = synthetic.planted(layers=2, heads=1, steps=1, grid=(4, 4), sink=8, sink_layers=[1])
    >>> gas_by_token(find_sinks(ds), ds).sel(group="<pad>").values.tolist()
    [0.0, 1.0]
    """
    groups = key_groups(ds if ds is not None else sinks, by)
    order = list(dict.fromkeys(np.asarray(groups.values).ravel().tolist()))
    hot = one_hot(groups, "group", order)
    hit = xr.dot(sinks["gas"].reset_coords(drop=True).astype(np.float32), hot, dim="key") > 0
    reduce = [d for d in ("sample", "step") if d in hit.dims]
    return hit.where(hot.any("key")).mean(reduce).rename("gas_frequency")


def sinks_by_layer(sinks: xr.Dataset, ds: xr.Dataset | None = None, *, by: str = "token") -> pd.DataFrame:
    """The per-layer summary: GAS tokens, their share of attention, and the literature criteria.

    Columns (means over samples and steps): ``layer``, ``layer_kind``, ``gas`` (the tokens found
    as global attention sinks, grouped by what they are — ``by`` as in :func:`ratio_by_token` —
    each with the share of (sample, step) pairs, among samples whose prompt holds it, in which
    it is a GAS), ``gas_share``, ``gas_count``, ``gu_sink_heads``, and with hidden norms
    ``high_norm`` and ``massive`` (tokens per step). When ``ds`` holds ``key_kind``, also
    ``top_kind`` and ``top_kind_share`` (:func:`mass_by_kind`).
    """
    reduce = [d for d in ("sample", "step") if d in sinks["gas_share"].dims]
    freq = gas_by_token(sinks, ds, by=by)
    order = [str(g) for g in freq.group.values]
    table = xr.Dataset(
        {
            "gas_share": sinks["gas_share"].mean(reduce),
            "gas_count": sinks["gas_count"].mean(reduce),
            "gu_sink_heads": sinks["gu_sink_heads"].mean(reduce),
            "gas_freq": freq,
        }
    )
    for var in ("high_norm", "massive"):
        if var in sinks:
            table[var] = sinks[var].sum("key").mean(reduce)
    if ds is not None and "key_kind" in ds.coords and ("key_mass" in ds or "full" in ds):
        kinds = mass_by_kind(ds)
        kinds = kinds.mean([d for d in ("sample", "step") if d in kinds.dims])
        table["top_kind_share"] = kinds.max("kind")
        table["top_kind"] = kinds.idxmax("kind")
    table = table.compute()
    rows = []
    for i, layer in enumerate(table["layer"].values):
        freq = table["gas_freq"].values[i]
        found = sorted(np.flatnonzero(freq > 0), key=lambda g: -freq[g])
        row = {
            "layer": str(layer),
            "layer_kind": str(table["layer_kind"].values[i]) if "layer_kind" in table.coords else "",
            "gas": ", ".join(f"{order[g]} ({freq[g]:.0%})" for g in found),
            "gas_share": float(table["gas_share"].values[i]),
            "gas_count": float(table["gas_count"].values[i]),
            "gu_sink_heads": float(table["gu_sink_heads"].values[i]),
        }
        for var in ("high_norm", "massive"):
            if var in table:
                row[var] = float(table[var].values[i])
        if "top_kind" in table:
            row["top_kind"] = str(table["top_kind"].values[i])
            row["top_kind_share"] = float(table["top_kind_share"].values[i])
        rows.append(row)
    return pd.DataFrame(rows)


def plot_sinks(sinks: xr.Dataset, ds: xr.Dataset | None = None, *, by: str = "token"):
    """The sink figure of :func:`attnlens.viz.figures.sink_figure` (a plotly ``Figure``)."""
    from ..viz.figures import sink_figure

    return sink_figure(sinks, ds, by=by)
