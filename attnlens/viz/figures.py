"""Plotly figures of captured attention, with token axes that name what they show.

Every figure here labels each value with the label of that value: a token axis names the
tokens (grouped by what they are when samples are pooled, see
:func:`attnlens.analysis.key_groups`), colour bars say what they encode and in which scale,
and thresholds the analyses use are drawn where they apply.

>>> from attnlens.analysis import synthetic, find_sinks
>>> ds = synthetic.planted(layers=4, heads=2, steps=1, grid=(2, 2), sink=8, sink_layers=[2])
>>> fig = sink_figure(find_sinks(ds), ds)
>>> fig.data[0].colorbar.title.text
'sink ratio r = N·α (log scale)'
>>> list(fig.data[0].x[:3])
['a', 'red', 'mug']
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from ..analysis import gas_by_token, ratio_by_token
from ..analysis._common import IMAGE

__all__ = ["RATIO_TICKS", "map_heatmap", "ratio_colorbar", "sink_figure", "static_images", "token_bars"]

#: how the token axis names each way of grouping keys (:func:`attnlens.analysis.key_groups`)
GROUP_NAMES = {"token": "token string", "word": "word", "kind": "token kind", "position": "position"}

#: sink ratios marked on log colour bars
RATIO_TICKS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)

#: bar colours of the token kinds (stop words and padding stand out from content words)
KIND_COLOURS = {
    "content": "#4c78a8",
    "stop": "#f58518",
    "pad": "#bab0ac",
    "special": "#b279a2",
    "magnet": "#e45756",
    IMAGE: "#72b7b2",
}


def ratio_colorbar(zmax: float, threshold: float | None, **extra: object) -> dict:
    """A colour bar over ``log10 r`` whose ticks read as ratios, the GAS threshold named on it."""
    ticks = [t for t in RATIO_TICKS if np.log10(t) <= zmax + 1e-9]
    named = [threshold is not None and bool(np.isclose(t, threshold)) for t in ticks]
    text = [f"{t:g}" + (" = GAS r" if n else "") for t, n in zip(ticks, named, strict=True)]
    if threshold is not None and not any(named):
        ticks.append(threshold)
        text.append(f"{threshold:g} = GAS r")
    return {
        "title": {"text": "sink ratio r = N·α (log scale)", "side": "right"},
        "tickvals": np.log10(ticks).tolist(),
        "ticktext": text,
        **extra,
    }


def sink_figure(sinks: xr.Dataset, ds: xr.Dataset | None = None, *, by: str = "token") -> go.Figure:
    """Sink ratio per layer × token (log colour scale, GAS marked) above the GAS share per layer.

    Text keys are grouped by what they are (``by``: ``"token"``, ``"word"``, ``"kind"`` or
    ``"position"``, see :func:`attnlens.analysis.ratio_by_token`) and averaged over samples,
    steps and heads; image keys are summarised in two columns, their mean and their maximum over
    positions. A ring marks each (layer, token) that is a global attention sink in some
    (sample, step); its hover gives how often.

    Args:
        sinks: :func:`attnlens.analysis.find_sinks` of ``ds``.
        ds: the analysed Dataset (token strings); ``sinks`` alone gives kinds only.
        by: how keys are grouped across samples.

    Returns:
        a plotly ``Figure`` (heatmap ``(layer, token)`` and a bar per layer).
    """
    source = ds if ds is not None else sinks
    ratio = ratio_by_token(sinks, ds, by=by).compute()  # (layer, group)
    text = ratio.group_kind.values != IMAGE
    image = ratio.isel(group=np.flatnonzero(~text))
    columns = ratio.isel(group=np.flatnonzero(text))
    names = [str(g) for g in columns.group.values]
    z = [columns.values]
    if image.sizes["group"]:
        n = image.sizes["group"]
        z += [image.mean("group").values[:, None], image.max("group").values[:, None]]
        names += [f"image (mean of {n})", f"image (max of {n})"]
    z = np.concatenate(z, axis=1)
    layers = [str(v) for v in ratio.layer.values]
    threshold = float(sinks.attrs.get("min_ratio", 10.0))
    logz = np.log10(np.maximum(z, RATIO_TICKS[0]))
    zmax = max(float(np.nanmax(logz)), np.log10(threshold) + 0.3)

    freq = gas_by_token(sinks, ds, by=by).compute().transpose("layer", "group")
    fig = make_subplots(
        rows=2,
        cols=1,
        row_heights=[0.7, 0.3],
        vertical_spacing=0.3,  # room for the slanted token names between the two panels
        subplot_titles=(
            "sink ratio r per layer and token (mean over heads, samples and steps)",
            "share of all attention taken by the layer's global attention sinks",
        ),
    )
    fig.add_trace(
        go.Heatmap(
            z=logz,
            x=names,
            y=layers,
            zmin=np.log10(RATIO_TICKS[0]),
            zmax=zmax,
            colorscale="Viridis",
            customdata=z,
            colorbar=ratio_colorbar(zmax, threshold, len=0.62, y=0.7),
            hovertemplate="layer %{y}<br>token %{x}<br>r = %{customdata:.2f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    hits = [
        (str(freq.layer.values[i]), str(freq.group.values[g]), float(freq.values[i, g]))
        for i, g in zip(*np.nonzero(freq.values > 0), strict=True)
        if str(freq.group.values[g]) in names
    ]
    if hits:
        fig.add_trace(
            go.Scatter(
                x=[h[1] for h in hits],
                y=[h[0] for h in hits],
                customdata=[h[2] for h in hits],
                mode="markers",
                marker={"symbol": "circle-open", "size": 12, "color": "red", "line": {"width": 2}},
                name="GAS in some (sample, step)",
                hovertemplate="layer %{y}<br>%{x} is a GAS in %{customdata:.0%} of (sample, step)"
                "<extra></extra>",
            ),
            row=1,
            col=1,
        )
    share = sinks["gas_share"].mean([d for d in ("sample", "step") if d in sinks["gas_share"].dims]).compute()
    fig.add_trace(
        go.Bar(x=layers, y=share.values, name="GAS share", marker_color="#4c78a8", showlegend=False),
        row=2,
        col=1,
    )
    fig.update_xaxes(
        tickangle=-50,
        tickmode="array",
        tickvals=names,
        ticktext=names,
        title_text=f"tokens, grouped by {GROUP_NAMES[by]}",
        row=1,
        col=1,
    )
    fig.update_xaxes(title_text="layer", row=2, col=1)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
    fig.update_yaxes(title_text="share of attention", rangemode="tozero", row=2, col=1)
    fig.update_layout(
        title=f"attention sinks over {source.sizes.get('sample', 1)} sample(s) × "
        f"{source.sizes.get('step', 1)} step(s)",
        height=640 + 14 * len(layers),
        legend={"orientation": "h", "y": -0.14, "x": 0},
        margin={"t": 90, "b": 90},
    )
    return fig


def token_bars(
    values: Sequence[float],
    tokens: Sequence[str],
    kinds: Sequence[str],
    *,
    marks: dict[int, str] | None = None,
    name: str = "value",
) -> tuple[list[go.Bar], list[str]]:
    """Bars over a token axis, one colour per token kind, tokens in ``marks`` annotated with their mark.

    Ticks read ``position: token`` so that repeated tokens stay distinct; ``marks`` maps a
    position to a short tag such as ``"GAS"`` or ``"magnet"``. Returns the traces (one per
    kind, for the legend) and the tick labels in sequence order, for the axis'
    ``categoryarray`` (plotly would otherwise order categories trace by trace).

    >>> traces, labels = token_bars([0.5, 0.2], ["a", "cat"], ["stop", "content"], marks={0: "magnet"})
    >>> [t.name for t in traces], labels
    (['stop', 'content'], ['0: a [magnet]', '1: cat'])
    """
    marks = marks or {}
    labels = [f"{i}: {t}" + (f" [{marks[i]}]" if i in marks else "") for i, t in enumerate(tokens)]
    traces = []
    for kind in dict.fromkeys(kinds):
        at = [i for i, k in enumerate(kinds) if k == kind]
        traces.append(
            go.Bar(
                x=[labels[i] for i in at],
                y=[float(values[i]) for i in at],
                name=str(kind),
                marker_color=KIND_COLOURS.get(str(kind), "#999999"),
                hovertemplate="%{x}<br>" + name + " = %{y:.4f}<extra>" + str(kind) + "</extra>",
            )
        )
    return traces, labels


def map_heatmap(
    values: np.ndarray, *, colorbar_title: str, under: tuple[float, float] | None = None
) -> go.Heatmap:
    """A ``(y, x)`` map on the token grid as a heatmap whose colour bar names its unit.

    ``under``: the subplot's horizontal domain, to lay the colour bar flat under it (out of the
    way of a neighbouring subplot) rather than upright at the figure's right edge.
    """
    colorbar: dict = {"title": {"text": colorbar_title, "side": "right"}}
    if under is not None:
        colorbar = {
            "title": {"text": colorbar_title, "side": "top"},
            "orientation": "h",
            "x": (under[0] + under[1]) / 2,
            "xanchor": "center",
            "len": under[1] - under[0],
            "y": -0.18,
            "yanchor": "top",
            "thickness": 12,
        }
    return go.Heatmap(
        z=np.asarray(values),
        colorscale="Magma",
        colorbar=colorbar,
        hovertemplate="token y %{y}, x %{x}<br>%{z:.4f}<extra></extra>",
    )


def static_images(enable: bool = True) -> bool:
    """Let notebooks keep a PNG beside each interactive plotly figure; ``True`` where it can.

    Sets plotly's default renderer to ``plotly_mimetype+png``: JupyterLab shows the interactive
    figure, while GitHub, nbconvert and the documentation, which cannot run plotly's
    JavaScript, show the PNG. The PNG is drawn by ``kaleido`` in a headless Chrome or Chromium;
    where neither is installed the renderer stays interactive only and this returns ``False``.
    """
    import plotly.io as pio

    if not enable:
        pio.renderers.default = "plotly_mimetype"
        return False
    # plotly passes its own browser options, which a running server ignores, with a warning each time
    warnings.filterwarnings("ignore", message="The kopts argument is ignored", category=UserWarning)
    try:
        import kaleido

        kaleido.start_sync_server(silence_warnings=True)  # one browser for every figure
        go.Figure().to_image(format="png", width=10, height=10)
    except Exception:  # no kaleido, or no browser for it: interactive figures only
        pio.renderers.default = "plotly_mimetype"
        return False
    pio.renderers.default = "plotly_mimetype+png"
    pio.defaults.default_width = 1000  # plotly's 700 px crowds the token axes
    return True
