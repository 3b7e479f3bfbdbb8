"""``ds.attnlens``: maps, token tables and selections on any capture Dataset, stored or in memory.

Registered as an xarray Dataset accessor when attnlens is imported.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .errors import SelectionError, choices

__all__ = ["AttnlensAccessor"]


class AttnlensAccessor:
    """``ds.attnlens``: maps, token tables and selections on a capture Dataset (stored or in memory).

    >>> import attnlens
    >>> from attnlens.testing import tiny_flux_transformer, flux_inputs, tiny_t5_tokenizer
    >>> model, tok = tiny_flux_transformer(), tiny_t5_tokenizer(model_max_length=8)
    >>> labels = attnlens.label_tokens(tok, tok("a red cat", padding="max_length", max_length=8).input_ids)
    >>> with attnlens.capture(model, keep="cross", labels=[labels]) as cap:
    ...     _ = model(**flux_inputs(model, height=4, width=6, text_len=8))
    >>> cap.result.attnlens.map(word="cat").dims
    ('y', 'x')
    >>> cap.result.attnlens.tokens(sample=0)[["token_str", "word", "token_kind"]].head(4).values.tolist()
    [['▁a', 'a', 'stop'], ['▁red', 'red', 'content'], ['▁cat', 'cat', 'content'], ['</s>', '', 'special']]
    >>> cap.result.attnlens.select(token_kind="content").sizes["key_text"]
    2
    """

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def map(
        self,
        word: str | None = None,
        *,
        token: int | str | Sequence[int] | None = None,
        layer: str | int | Sequence[str | int] | None = None,
        head: int | str | Sequence[int | str] | None = None,
        step: int | Sequence[int] | None = None,
        sample: int | str | None = None,
        variable: str = "cross",
    ) -> xr.DataArray:
        """The spatial attention map of a word or token: ``(y, x)``, or ``(frame, y, x)`` for video.

        Attention to (``cross``: image queries → text keys) or from (``text_to_image``) the
        word's tokens, summed over its tokens (the probability mass the word gets or gives),
        then averaged over the chosen layers, heads and steps.

        Args:
            word: a word of the prompt (case-insensitive); or give ``token``.
            token: text position(s), or a token string such as ``"▁cat"``.
            layer: layer names, glob patterns (``"single.*"``) or positions; default all.
            head: head labels; default all (or the stored reduction).
            step: step indices; default all.
            sample: a ``sample`` label or a ``sample_id``; needed when the Dataset holds several.
            variable: ``"cross"`` or ``"text_to_image"``.

        Returns:
            a computed DataArray ``(y, x)`` or ``(frame, y, x)``.
        """
        ds = self._ds
        if variable not in ("cross", "text_to_image") or variable not in ds:
            have = [v for v in ("cross", "text_to_image") if v in ds]
            raise SelectionError(
                f"no {variable!r} in this Dataset; maps come from {choices(have) or 'cross or text_to_image'}"
                " (capture with keep='cross')"
            )
        one = ds.isel(sample=self._sample_position(sample))
        text_dim = "key_text" if variable == "cross" else "query_text"
        positions = self._text_positions(one, word, token)
        selection = {
            text_dim: positions,
            "layer": self._layer_positions(layer),
            "step": self._positions("step", step),
            "head": self._positions("head", head),
        }
        chosen = one[variable].isel(selection).transpose("step", "layer", "head", ..., text_dim)
        # read the (small) selection, then reduce with numpy: the same map from a store as in memory
        values = np.asarray(chosen.values).sum(axis=-1).mean(axis=(0, 1, 2))  # (space,)
        frame, y, x = (np.asarray(ds[c].values) for c in ("frame", "y", "x"))
        grid = np.full((frame.max() + 1, y.max() + 1, x.max() + 1), np.nan, dtype=values.dtype)
        grid[frame, y, x] = values
        attrs = {
            "variable": variable,
            "word": word,
            "token": None if token is None else np.atleast_1d(token).tolist(),
            "text_positions": positions,
            "sample": int(one["sample"].values),
        }
        coords = {
            "frame": np.arange(grid.shape[0]),
            "y": np.arange(grid.shape[1]),
            "x": np.arange(grid.shape[2]),
        }
        if grid.shape[0] == 1:
            return xr.DataArray(
                grid[0],
                dims=("y", "x"),
                coords={"y": coords["y"], "x": coords["x"]},
                name=variable,
                attrs=attrs,
            )
        return xr.DataArray(grid, dims=("frame", "y", "x"), coords=coords, name=variable, attrs=attrs)

    def tokens(self, sample: int | str | None = None) -> pd.DataFrame:
        """The text tokens of every sample (or one), as a table.

        Returns:
            a DataFrame indexed by ``(sample, key_text)`` (or ``key_text`` for one sample)
            with columns ``token_str``, ``word``, ``word_index``, ``token_kind``.
        """
        ds = self._ds
        names = ["token_str", "word", "word_index", "token_kind"]
        if sample is not None:
            ds = ds.isel(sample=self._sample_position(sample))
        table = ds.reset_coords()[names].compute().to_dataframe()
        return table[names]

    def select(
        self,
        *,
        layer_kind: str | Sequence[str] | None = None,
        token_kind: str | Sequence[str] | None = None,
    ) -> xr.Dataset:
        """The Dataset restricted to layers of some kinds and text tokens of some kinds.

        ``token_kind`` applies to the text dimensions ``key_text``/``query_text`` and to the
        joint ``key``/``query_all`` (whose image tokens have kind ``"image"``). A position kept
        because its kind matches in one sample, but not in another, is NaN in the other.

        >>> import attnlens
        >>> from attnlens.testing import tiny_flux_transformer, flux_inputs
        >>> model = tiny_flux_transformer(num_single_layers=2)
        >>> with attnlens.capture(model, keep="key_mass") as cap:
        ...     _ = model(**flux_inputs(model))
        >>> list(cap.result.attnlens.select(layer_kind="single").layer.values)
        ['single.0', 'single.1']
        >>> cap.result.attnlens.select(token_kind="image").sizes["key"]
        16
        """
        ds = self._ds
        if layer_kind is not None:
            kinds = _as_list(layer_kind)
            have = [str(k) for k in np.asarray(ds.layer_kind.values)]
            unknown = [k for k in kinds if k not in have]
            if unknown:
                raise SelectionError(
                    f"no layer of kind {choices(unknown)}; kinds here: {choices(sorted(set(have)))}"
                )
            ds = ds.isel(layer=[i for i, k in enumerate(have) if k in kinds])
        if token_kind is not None:
            kinds = _as_list(token_kind)
            valid = set(np.asarray(ds.token_kind.values).ravel().tolist()) | {"image"}
            unknown = [k for k in kinds if k not in valid]
            if unknown:
                raise SelectionError(
                    f"no token of kind {choices(unknown)}; kinds here: {choices(sorted(valid))}"
                )
            text = np.isin(np.asarray(ds.token_kind.values).astype(object), kinds)  # (sample, key_text)
            joint = np.isin(np.asarray(ds.key_kind.values).astype(object), kinds)  # (sample, key)
            for dims, mask in ((("key_text", "query_text"), text), (("key", "query_all"), joint)):
                keep = np.flatnonzero(mask.any(axis=0))
                uniform = bool((mask == mask[:1]).all())
                for dim in dims:
                    if dim not in ds.dims:
                        continue
                    if not uniform:
                        m = xr.DataArray(mask, dims=("sample", dim))
                        ds = ds.assign({v: ds[v].where(m) for v in ds.data_vars if dim in ds[v].dims})
                    ds = ds.isel({dim: keep})
        return ds

    # -- resolving selectors ---------------------------------------------------------------

    def _sample_position(self, sample: int | str | None) -> int:
        ds = self._ds
        n = ds.sizes.get("sample", 0)
        labels = np.asarray(ds["sample"].values)
        if sample is None:
            if n == 1:
                return 0
            raise SelectionError(
                f"this Dataset holds {n} samples: choose one with sample= ({choices(labels)})"
            )
        if isinstance(sample, str) and "sample_id" in ds.coords:
            ids = [str(s) for s in np.asarray(ds.sample_id.values)]
            if sample in ids:
                return ids.index(sample)
            raise SelectionError(f"no sample with id {sample!r}; ids: {choices(ids)}")
        hits = np.flatnonzero(labels == sample)
        if not len(hits):
            raise SelectionError(f"no sample {sample!r}; samples: {choices(labels)}")
        return int(hits[0])

    def _text_positions(self, one: xr.Dataset, word: str | None, token: Any) -> list[int]:
        if (word is None) == (token is None):
            raise SelectionError("give exactly one of word= or token=")
        if word is not None:
            words = [str(w) for w in np.asarray(one.word.values)]
            positions = [i for i, w in enumerate(words) if w == word]
            if not positions:
                positions = [i for i, w in enumerate(words) if w.lower() == str(word).lower()]
            if not positions:
                present = sorted({w for w in words if w})
                raise SelectionError(
                    f"the word {word!r} is not in this sample's prompt; words: {choices(present) or 'none'}"
                    + ("" if present else " (the capture saw no tokenizer: pass labels= to capture)")
                )
            return positions
        n = one.sizes["key_text"]
        if isinstance(token, str):
            strs = [str(t) for t in np.asarray(one.token_str.values)]
            positions = [i for i, t in enumerate(strs) if t == token]
            if not positions:
                raise SelectionError(f"no token {token!r}; tokens: {choices([t for t in strs if t])}")
            return positions
        positions = [int(t) for t in np.atleast_1d(token)]
        bad = [t for t in positions if not -n <= t < n]
        if bad:
            raise SelectionError(f"token position(s) {bad} out of range: {n} text tokens")
        return [t % n for t in positions]

    def _layer_positions(self, layer: Any) -> list[int]:
        names = [str(n) for n in np.asarray(self._ds.layer.values)]
        if layer is None:
            return list(range(len(names)))
        chosen: list[int] = []
        for sel in _as_list(layer):
            if isinstance(sel, int | np.integer):
                if not -len(names) <= sel < len(names):
                    raise SelectionError(f"layer position {sel} out of range: {len(names)} layers")
                chosen.append(int(sel) % len(names))
                continue
            hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, str(sel))]
            if not hits:
                raise SelectionError(f"layer {sel!r} matches no layer here; layers: {choices(names)}")
            chosen.extend(hits)
        return sorted(set(chosen))

    def _positions(self, dim: str, sel: Any) -> list[int]:
        labels = np.asarray(self._ds[dim].values).tolist()
        if sel is None:
            return list(range(len(labels)))
        out = []
        for s in _as_list(sel):
            if s not in labels:
                raise SelectionError(f"no {dim} {s!r}; {dim}s: {choices(labels)}")
            out.append(labels.index(s))
        return out


def _register(cls: type) -> None:
    from xarray.core.extensions import AccessorRegistrationWarning

    current = getattr(xr.Dataset.__dict__.get("attnlens"), "_accessor", None)
    with warnings.catch_warnings():
        if getattr(current, "__qualname__", None) == cls.__qualname__:  # this module imported again
            warnings.simplefilter("ignore", AccessorRegistrationWarning)
        xr.register_dataset_accessor("attnlens")(cls)


_register(AttnlensAccessor)


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str | int | np.integer) else list(value)
