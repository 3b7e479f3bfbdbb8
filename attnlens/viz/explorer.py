"""``attnlens.explore``: one ipywidgets view of a capture or store, for JupyterLab.

Controls choose the sample, step, layer (or a mean over a group of layers), head (or their
mean), word and map kind; a plotly ``FigureWidget`` shows the chosen slice as a map on the
image token grid beside bars over the sample's own tokens, where global attention sinks and
magnets are marked. Given a referring expression and the image, a third panel shows what
RefAM makes of it: heatmap, points and mask.

Only the chosen slice is read (a store stays lazy) and each slice is kept once read, so moving
back and forth costs nothing. The figure's title states the selection, so a screenshot or the
static PNG kept beside the widget names what it shows.

>>> import attnlens
>>> from attnlens.analysis import synthetic
>>> ds = synthetic.planted(layers=3, heads=2, steps=2, grid=(4, 4), sink=8, sink_layers=[1])
>>> ex = attnlens.explore(ds)
>>> ex.controls["kind"].value = "sink ratio"
>>> ex.controls["layer"].value = "block.1"
>>> pad = next(t for t in ex.figure.data if t.name == "pad")  # bars of the padding tokens
>>> list(pad.x[:2]), round(max(pad.y), 1)
(['7: <pad>', '8: <pad> [GAS+magnet]'], 16.8)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from ..analysis import find_magnets, find_sinks
from ..analysis._common import IMAGE
from ..errors import MissingVariableError, NotAStoreError
from .figures import map_heatmap, token_bars

__all__ = ["KINDS", "Explorer", "explore"]

#: map kinds: what the map and the bars show
KINDS = {
    "cross": ("cross", "P(image token → word)", "mean P(image token → token)"),
    "text→image": ("text_to_image", "P(word → image token)", "P(token → all image tokens)"),
    "key mass": ("key_mass", "α: mean attention received", "α: mean attention received"),
    "sink ratio": ("key_mass", "r = N·α", "sink ratio r = N·α"),
}

MEAN = "mean"


def explore(
    source: Any,
    expression: str | None = None,
    *,
    image: Any = None,
    model: Any = None,
    **refam_options: Any,
) -> Explorer:
    """An interactive view of captured attention; display it in a notebook cell.

    Args:
        source: a capture Dataset (``cap.result``), a :class:`~attnlens.Capture`, or the path
            (or fsspec URL) of a store.
        expression: a referring expression: adds a RefAM panel (needs ``image`` and ``model``).
        image: the image RefAM segments, ``(H, W, 3)``.
        model: the model RefAM runs (a pipeline, or an embedded model's name).
        **refam_options: options of :func:`attnlens.refam.segment`.

    Returns:
        an :class:`Explorer`; its ``controls`` and ``figure`` can also be driven from code.
    """
    return Explorer(_dataset(source), expression=expression, image=image, model=model, **refam_options)


def _dataset(source: Any) -> xr.Dataset:
    if isinstance(source, xr.Dataset):
        return source
    if hasattr(source, "result") and isinstance(getattr(source, "result", None), xr.Dataset):
        return source.result
    if isinstance(source, str | os.PathLike):
        from ..store import open_store

        return open_store(source)
    raise NotAStoreError(
        f"explore takes a capture Dataset, a Capture or a store path; got a {type(source).__name__}"
    )


class Explorer:
    """Controls and a plotly ``FigureWidget`` over one capture Dataset (see :func:`explore`).

    Attributes:
        controls: the ipywidgets by name: ``sample``, ``step``, ``layer``, ``head``, ``word``, ``kind``.
        figure: the ``FigureWidget``: ``data[0]`` the map ``(y, x)``, then one bar trace per token kind.
        widget: the whole view (an ``ipywidgets.VBox``).
        refam: the :class:`~attnlens.refam.RefamResult` behind the RefAM panel, or ``None``.
    """

    def __init__(
        self,
        ds: xr.Dataset,
        *,
        expression: str | None = None,
        image: Any = None,
        model: Any = None,
        **refam_options: Any,
    ) -> None:
        import ipywidgets as widgets

        have = [k for k, (var, *_) in KINDS.items() if var in ds]
        if not have:
            raise MissingVariableError(
                "explore needs cross, text_to_image or key_mass in the Dataset, which holds "
                f"{', '.join(map(str, ds.data_vars)) or 'no variables'}"
            )
        if "sample" not in ds.dims:
            ds = ds.expand_dims("sample")
        self.ds = ds
        self._cache: dict[tuple, np.ndarray] = {}
        self._quiet = False
        self._marks: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {}
        self.refam = None
        if expression is not None:
            if image is None or model is None:
                raise MissingVariableError(
                    "a RefAM panel needs the image and the model beside the expression"
                )
            from .. import refam

            self.refam = refam.segment(image, expression, model=model, **refam_options)
            self._image = np.asarray(image)

        self.controls = _controls(ds, have)
        self._set_words()
        self.figure = self._empty_figure(expression)
        self._bars: list[int] = []
        if self.refam is not None:
            self._add_refam(col=3)
        for control in self.controls.values():
            control.observe(self._changed, names="value")
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.controls[n] for n in ("sample", "step", "layer")]),
                widgets.HBox([self.controls[n] for n in ("head", "word")]),
                self.controls["kind"],
                self.figure,
            ]
        )
        self.update()

    def _empty_figure(self, expression: str | None):
        """The ``FigureWidget``: map, token bars, and the RefAM panel's column when there is one."""
        from plotly.subplots import make_subplots

        cols = 3 if self.refam is not None else 2
        titles = ["map on the image token grid", "over this sample's text tokens"]
        if self.refam is not None:
            titles.append(f"RefAM: {expression!r}")
        sub = make_subplots(
            rows=1,
            cols=cols,
            column_widths=[0.32, 0.68] if cols == 2 else [0.26, 0.48, 0.26],
            subplot_titles=titles,
            horizontal_spacing=0.09,
        )
        figure = go.FigureWidget(sub)
        domain = tuple(sub.layout.xaxis.domain)
        figure.add_trace(map_heatmap(np.zeros((1, 1)), colorbar_title="", under=domain), row=1, col=1)
        figure.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain", row=1, col=1)
        figure.update_xaxes(constrain="domain", row=1, col=1)
        figure.update_layout(
            height=560,
            barmode="group",
            legend={"orientation": "h", "x": 0, "y": 1.1, "yanchor": "bottom"},
            margin={"t": 120, "b": 150},
        )
        return figure

    # -- display ---------------------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        """The live widget, with a PNG of the figure where :func:`~attnlens.viz.static_images` is on."""
        import plotly.io as pio

        bundle = dict(self.widget._repr_mimebundle_(**kwargs))
        if "png" in str(pio.renderers.default).split("+"):
            import base64

            png = self.static_figure().to_image(format="png", width=1100, height=self.figure.layout.height)
            bundle["image/png"] = base64.b64encode(png).decode("ascii")
        return bundle

    def static_figure(self):
        """The figure as it is now, as a plain plotly ``Figure`` (to save or render without a kernel)."""
        return go.Figure(self.figure.to_dict())

    # -- selection -------------------------------------------------------------------------------

    @property
    def selection(self) -> dict[str, Any]:
        """The current choice of every control (``word`` as the sample's text positions of the word)."""
        c = self.controls
        return {
            "sample": c["sample"].value,
            "step": c["step"].value,
            "layer": c["layer"].value,
            "head": c["head"].value,
            "word": list(self._words[c["word"].value]),
            "kind": c["kind"].value,
        }

    def _set_words(self) -> None:
        """Word choices of the chosen sample; the word shown stays if the new prompt holds it."""
        one = self.ds.isel(sample=self.controls["sample"].value)
        tokens = [str(t) for t in np.asarray(one.token_str.values)]
        words = [str(w) for w in np.asarray(one.word.values)]
        index = [int(w) for w in np.asarray(one.word_index.values)]
        kinds = [str(k) for k in np.asarray(one.token_kind.values)]
        # a word's tokens form one entry, a repeated word one entry per occurrence, all padding one
        groups: dict[tuple, list[int]] = {}
        for i in range(len(tokens)):
            key = (
                ("pad",) if kinds[i] == "pad" else (index[i],) if words[i] and index[i] >= 0 else ("token", i)
            )
            groups.setdefault(key, []).append(i)
        options: dict[str, tuple[int, ...]] = {}
        seen: dict[str, int] = {}
        for positions in groups.values():
            i = positions[0]
            name = words[i] or tokens[i] or f"#{i}"
            seen[name] = seen.get(name, 0) + 1
            repeat = f" #{seen[name]}" if seen[name] > 1 else ""
            count = f" ×{len(positions)}" if kinds[i] == "pad" else ""
            options[f"{name}{repeat}{count} ({kinds[i]})"] = tuple(positions)
        control = self.controls["word"]
        previous = control.value
        self._words = options
        self._quiet = True  # one redraw for the new sample, not one per changed option
        try:
            control.options = list(options)
            control.value = (
                previous
                if previous in options
                else next((k for k in options if "(content)" in k), next(iter(options)))
            )
        finally:
            self._quiet = False

    def _changed(self, change: dict) -> None:
        if self._quiet:
            return
        if change["owner"] is self.controls["sample"]:
            self._set_words()
        self.update()

    def _positions(self, dim: str, value: Any) -> list[int]:
        ds = self.ds
        if dim == "step":
            return list(range(ds.sizes["step"])) if value == MEAN else [int(value)]
        if dim == "head":
            labels = [str(h) for h in ds["head"].values]
            return list(range(len(labels))) if value == MEAN else [labels.index(str(value))]
        names = [str(n) for n in ds.layer.values]
        if value == "*":
            return list(range(len(names)))
        if value.endswith(".*"):
            return [i for i, k in enumerate(ds.layer_kind.values) if f"{k}.*" == value]
        return [names.index(value)]

    def _slice(self, variable: str) -> np.ndarray:
        """The chosen slice of ``variable``, mean over the chosen steps, layers and heads; cached."""
        s = self.selection
        key = (variable, s["sample"], s["step"], s["layer"], s["head"])
        if key not in self._cache:
            da = self.ds[variable].isel(
                sample=s["sample"],
                step=self._positions("step", s["step"]),
                layer=self._positions("layer", s["layer"]),
                head=self._positions("head", s["head"]),
            )
            values = np.asarray(da.transpose("step", "layer", "head", ...).values, dtype=np.float64)
            self._cache[key] = np.nanmean(values, axis=(0, 1, 2))
        return self._cache[key]

    def _sample_marks(self, sample: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``gas`` ``(step, layer, key)`` and ``magnet`` ``(step, layer, key_text)`` of one sample; cached."""
        if sample not in self._marks:
            one = self.ds.isel(sample=[sample])
            gas = magnet = None
            if "key_mass" in one or "full" in one:
                self._sinks = find_sinks(one)
                gas = self._sinks["gas"].isel(sample=0).transpose("step", "layer", "key").values
            if "cross" in one:
                magnet = (
                    find_magnets(one)["magnet"].isel(sample=0).transpose("step", "layer", "key_text").values
                )
            self._marks[sample] = (gas, magnet)
        return self._marks[sample]

    def _token_marks(self) -> dict[int, str]:
        """Text positions that are a GAS or a magnet somewhere in the chosen steps and layers."""
        s = self.selection
        gas, magnet = self._sample_marks(s["sample"])
        steps, layers = self._positions("step", s["step"]), self._positions("layer", s["layer"])
        text = np.flatnonzero(self._kinds_of("key") != IMAGE)
        marks: dict[int, str] = {}
        if magnet is not None:
            for i in np.flatnonzero(magnet[np.ix_(steps, layers)].any(axis=(0, 1))):
                marks[int(i)] = "magnet"
        if gas is not None:
            for i in np.flatnonzero(gas[np.ix_(steps, layers)].any(axis=(0, 1))[text]):
                marks[int(i)] = "GAS" + ("+magnet" if marks.get(int(i)) == "magnet" else "")
        return marks

    def _kinds_of(self, dim: str) -> np.ndarray:
        coord = "key_kind" if dim == "key" else "token_kind"
        return np.asarray(self.ds[coord].isel(sample=self.selection["sample"]).values).astype(str)

    # -- drawing -----------------------------------------------------------------------------------

    def _grid(self, values: np.ndarray) -> np.ndarray:
        """Image-token values ``(query,)`` on their ``(y, x)`` grid (the first frame of a video)."""
        ds = self.ds
        y, x = np.asarray(ds.y.values), np.asarray(ds.x.values)
        frame = np.asarray(ds.frame.values) if "frame" in ds.coords else np.zeros_like(y)
        grid = np.full((y.max() + 1, x.max() + 1), np.nan)
        first = frame == frame.min()
        grid[y[first], x[first]] = values[first]
        return grid

    def map_and_bars(self) -> tuple[np.ndarray, np.ndarray, str, str]:
        """What the figure shows now: ``(map (y, x), bars (key_text,), map unit, bar unit)``."""
        s = self.selection
        variable, map_unit, bar_unit = KINDS[s["kind"]]
        word = s["word"]
        if variable == "cross":
            p = self._slice("cross")  # (query, key_text)
            return self._grid(p[:, word].sum(axis=1)), p.mean(axis=0), map_unit, bar_unit
        if variable == "text_to_image":
            p = self._slice("text_to_image")  # (query_text, key_image)
            return self._grid(p[word].sum(axis=0)), p.sum(axis=1), map_unit, bar_unit
        alpha = self._slice("key_mass")  # (key,)
        values = alpha * alpha.size if s["kind"] == "sink ratio" else alpha
        image = self._kinds_of("key") == IMAGE
        return self._grid(values[image]), values[~image], map_unit, bar_unit

    def update(self) -> None:
        """Redraw the figure for the current selection."""
        s = self.selection
        grid, bars, map_unit, bar_unit = self.map_and_bars()
        one = self.ds.isel(sample=s["sample"])
        tokens = [str(t) for t in np.asarray(one.token_str.values)]
        traces, labels = token_bars(
            bars, tokens, list(self._kinds_of("key_text")), marks=self._token_marks(), name=bar_unit
        )
        if s["kind"] == "sink ratio" and "min_ratio" in getattr(self, "_sinks", xr.Dataset()).attrs:
            threshold = float(self._sinks.attrs["min_ratio"])
            traces.append(
                go.Scatter(
                    x=[labels[0], labels[-1]],
                    y=[threshold, threshold],
                    mode="lines",
                    line={"dash": "dash", "color": "red"},
                    name=f"GAS threshold r = {threshold:g}",
                )
            )
        c = self.controls
        title = (
            f"sample {c['sample'].label} · step {c['step'].label} · layer {c['layer'].label} · "
            f"head {c['head'].label} · word {c['word'].value} · {s['kind']}"
        )
        with self.figure.batch_update():
            heat = self.figure.data[0]
            heat.z = grid
            heat.colorbar.title.text = map_unit
            keep = [t for i, t in enumerate(self.figure.data) if i not in self._bars]
            self.figure.data = keep
            first = len(self.figure.data)
            for trace in traces:
                self.figure.add_trace(trace, row=1, col=2)
            self._bars = list(range(first, first + len(traces)))
            self.figure.update_yaxes(title_text=bar_unit, row=1, col=2)
            self.figure.update_xaxes(tickangle=-50, categoryorder="array", categoryarray=labels, row=1, col=2)
            self.figure.layout.title = {"text": title, "font": {"size": 13}, "y": 0.98, "yanchor": "top"}

    def _add_refam(self, col: int) -> None:
        r = self.refam
        self.figure.add_trace(go.Image(z=self._image), row=1, col=col)
        self.figure.add_trace(
            go.Heatmap(z=r.heatmap, colorscale="Magma", opacity=0.55, showscale=False, name="RefAM heatmap"),
            row=1,
            col=col,
        )
        self.figure.add_trace(
            go.Contour(
                z=r.mask.astype(float),
                showscale=False,
                contours={"start": 0.5, "end": 0.5, "coloring": "lines"},
                colorscale=[[0, "cyan"], [1, "cyan"]],
                line={"width": 2},
                showlegend=True,
                name="RefAM mask",
                hoverinfo="skip",
            ),
            row=1,
            col=col,
        )
        positive = r.point_labels == 1
        self.figure.add_trace(
            go.Scatter(
                x=r.points[positive, 0],
                y=r.points[positive, 1],
                mode="markers",
                marker={
                    "symbol": "star",
                    "size": 14,
                    "color": "lime",
                    "line": {"width": 1, "color": "black"},
                },
                name="RefAM points",
            ),
            row=1,
            col=col,
        )
        self.figure.update_yaxes(
            autorange="reversed", scaleanchor=f"x{col}", constrain="domain", row=1, col=col
        )
        self.figure.update_xaxes(constrain="domain", row=1, col=col)


def _controls(ds: xr.Dataset, kinds: list[str]) -> dict[str, Any]:
    """The explorer's ipywidgets, labelled with what each choice is (timesteps, group sizes)."""
    import ipywidgets as widgets

    ids = ds["sample_id"].values if "sample_id" in ds.coords else ds["sample"].values
    steps = [(f"mean of {ds.sizes['step']} steps", MEAN)] if ds.sizes.get("step", 1) > 1 else []
    for i in range(ds.sizes.get("step", 1)):
        t = (
            f" (t = {float(ds.timestep.values[i]):g}, {ds.branch.values[i]})"
            if "timestep" in ds.coords
            else ""
        )
        steps.append((f"{i}{t}", i))
    layers = [(f"mean of all {ds.sizes['layer']} layers", "*")]
    if "layer_kind" in ds.coords:
        of = [str(k) for k in ds.layer_kind.values]
        layers += [(f"mean of {of.count(k)} {k} layers", f"{k}.*") for k in dict.fromkeys(of)]
    layers += [(str(n), str(n)) for n in ds.layer.values]
    heads = [str(h) for h in ds["head"].values]
    heads = ([(f"mean of {len(heads)} heads", MEAN)] if len(heads) > 1 else []) + [(h, h) for h in heads]
    return {
        "sample": widgets.Dropdown(options=[(str(s), i) for i, s in enumerate(ids)], description="sample"),
        "step": widgets.Dropdown(options=steps, description="step"),
        "layer": widgets.Dropdown(options=layers, description="layer"),
        "head": widgets.Dropdown(options=heads, description="head"),
        "word": widgets.Dropdown(description="word"),
        "kind": widgets.ToggleButtons(options=kinds, description="map"),
    }
