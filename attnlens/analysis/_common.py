"""Helpers shared by the analyses: input checks, token positions, labels and groups, masks, targets.

Prompts differ between samples, so a position along ``key`` or ``key_text`` names different
tokens in different samples. Whatever is averaged over samples is therefore grouped by what a
token *is* (:func:`key_groups`: its string, word or kind), never by where it stands.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from ..errors import LayoutError, MissingVariableError, SelectionError, choices

IMAGE = "image"

#: how :func:`key_groups` can name a key: what it is (the same across samples), or where it stands
GROUP_BY = ("token", "word", "kind", "position")


def require(ds: xr.Dataset, *names: str, analysis: str) -> None:
    """Raise :class:`MissingVariableError` unless ``ds`` holds every variable or coordinate in ``names``."""
    missing = [n for n in names if n not in ds.variables]
    if missing:
        have = sorted(str(v) for v in ds.data_vars)
        raise MissingVariableError(
            f"{analysis} needs {', '.join(missing)} in the Dataset, which holds "
            f"{', '.join(have) or 'no variables'}; "
            f"capture with keep=({', '.join(repr(n) for n in missing)}, ...)"
        )


def first_sample(coord: xr.DataArray) -> np.ndarray:
    """A per-sample coordinate's values for the first sample (the token layout is shared by all)."""
    if "sample" in coord.dims:
        coord = coord.isel(sample=0)
    return np.asarray(coord.values)


def text_positions(ds: xr.Dataset) -> np.ndarray:
    """Indices along ``key`` of the text tokens, in sequence order (``key_text`` is their order)."""
    require(ds, "key_kind", analysis="locating text tokens")
    return np.flatnonzero(first_sample(ds["key_kind"]).astype(str) != IMAGE)


def image_positions(ds: xr.Dataset) -> np.ndarray:
    """Indices along ``key`` of the image/video tokens, in sequence order (``query`` is their order)."""
    require(ds, "key_kind", analysis="locating image tokens")
    return np.flatnonzero(first_sample(ds["key_kind"]).astype(str) == IMAGE)


def mean_heads(da: xr.DataArray) -> xr.DataArray:
    """Mean over ``head`` where the dimension exists (head reductions already removed it)."""
    return da.mean("head") if "head" in da.dims else da


def key_labels(ds: xr.Dataset) -> xr.DataArray:
    """A readable label of every key: the token string of text keys, ``img(y,x)`` of image keys
    (``img(frame,y,x)`` in a video).

    Dims: ``(sample, key)`` when the Dataset has ``sample``, else ``(key,)``; eager (labels are small).
    """
    kinds = ds["key_kind"]
    values = np.asarray(kinds.values).astype(str).astype(object)
    image = np.flatnonzero(first_sample(kinds).astype(str) == IMAGE)
    text = np.flatnonzero(first_sample(kinds).astype(str) != IMAGE)
    if "y" in ds.coords and "x" in ds.coords and len(image) == ds.sizes.get("query", -1):
        frames = ds["frame"].values if "frame" in ds.coords and ds["frame"].max() > 0 else None
        values[..., image] = [
            f"img({y},{x})" if frames is None else f"img({f},{y},{x})"
            for f, y, x in zip(
                frames if frames is not None else ds["y"].values, ds["y"].values, ds["x"].values, strict=True
            )
        ]
    else:
        values[..., image] = [f"img#{i}" for i in range(len(image))]
    if "token_str" in ds.coords:
        tokens = np.asarray(ds["token_str"].values).astype(str).astype(object)
        index = np.broadcast_to(np.arange(len(text)), tokens.shape)
        values[..., text] = np.where(tokens != "", tokens, "#" + index.astype(str).astype(object))
    return xr.DataArray(values, dims=kinds.dims, coords={d: ds[d] for d in kinds.dims if d in ds.indexes})


def key_groups(ds: xr.Dataset, by: str = "token") -> xr.DataArray:
    """What each key is, ``(sample, key)`` (``(key,)`` without ``sample``): the label to group by.

    ``by``: ``"token"`` (the token string; image keys ``img(y,x)``), ``"word"`` (the word a text
    token belongs to, so that a word split into several tokens is one group; padding and special
    tokens keep their token string), ``"kind"`` (``key_kind``: content, stop, pad, special,
    magnet, image) or ``"position"`` (``token@position``; only where every sample has the same
    tokens, since a position names different tokens in different prompts).

    >>> from attnlens.analysis import synthetic
    >>> ds = synthetic.from_probabilities(
    ...     synthetic.random_attention((2, 1, 1, 1), 5),
    ...     [synthetic.prompt_labels("a cat", 4), synthetic.prompt_labels("the dog", 4)],
    ...     grid=(1, 1),
    ... )
    >>> key_groups(ds).values.tolist()
    [['a', 'cat', '</s>', '<pad>', 'img(0,0)'], ['the', 'dog', '</s>', '<pad>', 'img(0,0)']]
    >>> key_groups(ds, "kind").values[1].tolist()
    ['stop', 'content', 'special', 'pad', 'image']
    """
    if by not in GROUP_BY:
        raise SelectionError(f"cannot group keys by {by!r}; choose one of {choices(GROUP_BY)}")
    require(ds, "key_kind", analysis=f"grouping keys by {by}")
    if by == "kind":
        kinds = ds["key_kind"]
        return kinds.copy(data=np.asarray(kinds.values).astype(str).astype(object)).reset_coords(drop=True)
    labels = key_labels(ds)
    values = np.asarray(labels.values)
    if by == "word" and "word" in ds.coords:
        words = np.asarray(ds["word"].values).astype(str).astype(object)
        text = text_positions(ds)
        values[..., text] = np.where(words != "", words, values[..., text])
    if by == "position":
        if values.ndim == 2 and (values != values[:1]).any():
            differ = np.flatnonzero((values != values[:1]).any(axis=1))
            raise LayoutError(
                f"samples {choices(differ)} hold other tokens than sample 0 at the same positions: "
                "group by token, word or kind instead"
            )
        values = values + np.array([f"@{k}" for k in range(values.shape[-1])], dtype=object)
    return labels.copy(data=values)


def group_mean(
    values: xr.DataArray, groups: xr.DataArray, over: Sequence[str] = ("sample", "step")
) -> xr.DataArray:
    """Mean of ``values`` ``(…, key)`` over every occurrence of each group in ``key`` and ``over``.

    ``groups`` is :func:`key_groups`' ``(sample, key)`` labels; the result is ``(…, group)``
    without ``key`` and the dims of ``over``, its groups in order of first appearance. NaN
    values (a key a layer does not cover) are left out of the mean; lazy inputs stay lazy.
    """
    order = list(dict.fromkeys(np.asarray(groups.values).ravel().tolist()))
    hot = one_hot(groups, "group", order)
    over = [d for d in over if d in values.dims]
    in_hot = [d for d in over if d in hot.dims]
    rest = [d for d in over if d not in hot.dims]
    values = values.reset_coords(drop=True)
    total = xr.dot(values.fillna(0.0), hot, dim=["key", *in_hot]).sum(rest)
    count = xr.dot(values.notnull().astype(np.float32), hot, dim=["key", *in_hot]).sum(rest)
    return total / count.where(count > 0)


def one_hot(labels: xr.DataArray, dim: str, categories: Sequence[str] | None = None) -> xr.DataArray:
    """``(…, dim, category)`` float indicator of each label's category; ``categories``: sorted by default.

    Lazy (dask-backed) labels, as a store opens them, give a lazy result chunked as they are,
    so that an analysis of many samples never holds every sample's indicators at once.
    """
    cats = sorted(_label_set(labels)) if categories is None else list(categories)
    wanted = np.array(cats, dtype=str)

    def encode(values: np.ndarray) -> np.ndarray:
        return (np.asarray(values).astype(str)[..., None] == wanted).astype(np.float32)

    hot = xr.apply_ufunc(
        encode,
        labels.reset_coords(drop=True),
        output_core_dims=[[dim]],
        dask="parallelized",
        output_dtypes=[np.float32],
        dask_gufunc_kwargs={"output_sizes": {dim: len(cats)}},
    )
    return hot.assign_coords({dim: cats})


def _label_set(labels: xr.DataArray) -> set[str]:
    """The distinct labels, read one chunk at a time where they are lazy."""

    def distinct(block: np.ndarray) -> set[str]:
        return set(np.asarray(block).astype(str).ravel().tolist())

    data = labels.data
    if not hasattr(data, "to_delayed"):
        return distinct(data)
    import dask

    return set().union(*dask.compute(*(dask.delayed(distinct)(b) for b in data.to_delayed().ravel())))


def target_tokens(ds: xr.Dataset, targets: str | Sequence[str] | xr.DataArray) -> xr.DataArray:
    """``(sample, key_text)`` 0/1 selection of each sample's target word(s) (case-insensitive).

    ``targets``: one word for every sample; one word (or ``"word1 word2"``) per sample; or a
    boolean DataArray over ``key_text`` (and ``sample``) chosen by the caller.
    """
    if isinstance(targets, xr.DataArray):
        return targets.astype(np.float32)
    require(ds, "word", analysis="selecting target words")
    words = np.asarray(ds["word"].values).astype(str)
    if words.ndim == 1:
        words = words[None]
    lower = np.char.lower(words)
    if isinstance(targets, str):
        wanted = [targets] * lower.shape[0]
    else:
        wanted = [str(t) for t in targets]
        if len(wanted) != lower.shape[0]:
            raise LayoutError(
                f"{len(wanted)} targets given for {lower.shape[0]} samples: give one per sample"
            )
    sel = np.zeros(lower.shape, dtype=np.float32)
    for i, target in enumerate(wanted):
        sel[i] = np.isin(lower[i], target.lower().split())
        if not sel[i].any():
            known = ", ".join(sorted({w for w in words[i] if w})) or "none"
            raise MissingVariableError(f"target {target!r} is not a word of sample {i}; its words: {known}")
    dims = ("sample", "key_text") if "sample" in ds["word"].dims else ("key_text",)
    return xr.DataArray(sel if dims[0] == "sample" else sel[0], dims=dims)


def query_mask(ds: xr.Dataset, mask: xr.DataArray | np.ndarray) -> xr.DataArray:
    """A ground-truth mask as a bool over the ``query`` tokens: ``(sample, query)`` or ``(query,)``.

    ``mask``: a DataArray over ``query``; or over ``y, x`` (optionally ``frame``, ``sample``) at
    the token grid or at any integer multiple of it (pixels), where a token is inside when at
    least half of its pixels are; or a numpy array ``(y, x)`` or ``(sample, y, x)``.
    """
    if not isinstance(mask, xr.DataArray):
        arr = np.asarray(mask)
        dims = {2: ("y", "x"), 3: ("sample", "y", "x"), 4: ("sample", "frame", "y", "x")}.get(arr.ndim)
        if dims is None:
            raise LayoutError(
                f"a mask must be (y, x), (sample, y, x) or (sample, frame, y, x); got shape {arr.shape}"
            )
        mask = xr.DataArray(arr, dims=dims)
    if "query" in mask.dims:
        return mask.astype(bool)
    grid = {d: int(ds[d].max()) + 1 for d in ("frame", "y", "x") if d in mask.dims}
    for d, n in grid.items():
        if mask.sizes[d] % n:
            raise LayoutError(f"a mask of {mask.sizes[d]} along {d} does not tile the token grid of {n}")
    factors = {d: mask.sizes[d] // n for d, n in grid.items() if mask.sizes[d] != n}
    mask = mask.drop_vars([d for d in grid if d in mask.coords]).astype(np.float32)
    if factors:
        mask = mask.coarsen(factors).mean()
    at = {d: ds[d].reset_coords(drop=True) for d in grid}
    return (mask.isel(at) >= 0.5).drop_vars(
        [d for d in ("frame", "y", "x") if d in ds.coords], errors="ignore"
    )


def carry_coords(out: xr.Dataset | xr.DataArray, ds: xr.Dataset) -> xr.Dataset | xr.DataArray:
    """``out`` with the coordinates of ``ds`` that live on its dims (``timestep``, ``layer_kind``, …)."""
    dims = set(out.dims)
    extra = {
        name: coord
        for name, coord in ds.coords.items()
        if name not in out.coords and coord.dims and set(coord.dims) <= dims
    }
    return out.assign_coords(extra)
