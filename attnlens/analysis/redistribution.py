"""Redistribution: how attention moves between two captures of the same input.

The two captures differ in one controlled way: magnet tokens appended to the prompt (RefAM),
or a sink suppressed or redirected (:func:`attnlens.suppress`). Definitions (DESIGN.md §6), per
sample, step and layer, from ``cross`` averaged over heads:

- the **target map** ``m_q = Σ_{t ∈ target} P[q, t]`` over image tokens ``q``, and its
  normalisation ``p_q = m_q / Σ m``;
- **entropy** ``H = −Σ p_q log p_q`` (nats; ``log N_image`` for a flat map);
- **peak-to-background** ``max_q m_q / median_q m_q``;
- **mass inside** a mask ``Σ_{q ∈ mask} p_q`` (and outside, its complement), when a mask is given;
- **transport**: over the background queries (outside the mask, or every image query without
  one), the mean attention per query to each destination: each text token, grouped as
  ``kind:word`` (``content:mug``, ``stop:the``, ``magnet:the``, ``pad:<pad>``), and ``image``
  (all image keys, ``1 − Σ`` text). Its change between the captures says where the moved
  background mass went; the changes sum to zero.

Tokens are matched between the captures by word, not position, since appended tokens shift them.

>>> from attnlens.analysis import synthetic, redistribution
>>> a = synthetic.planted(layers=2, heads=1, steps=1, grid=(4, 4), seed=0)
>>> b = synthetic.planted(layers=2, heads=1, steps=1, grid=(4, 4), seed=1)
>>> redistribution(a, b, "mug").entropy.dims
('run', 'sample', 'step', 'layer')
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from ..errors import LayoutError
from ._common import carry_coords, mean_heads, one_hot, query_mask, require, target_tokens

__all__ = ["destinations", "redistribution", "target_map", "transport"]

RUNS = ("before", "after")


def target_map(ds: xr.Dataset, target: str | Sequence[str] | xr.DataArray) -> xr.DataArray:
    """The target word's map ``(…, layer, query)``: ``cross`` summed over its tokens, mean over heads."""
    require(ds, "cross", analysis="target_map")
    cross = ds["cross"].reset_coords(drop=True)
    return carry_coords(
        mean_heads(xr.dot(cross, target_tokens(ds, target), dim="key_text")).rename("map"), ds
    )


def _check_pair(before: xr.Dataset, after: xr.Dataset) -> None:
    for dim in ("query", "layer", "sample", "step"):
        if before.sizes.get(dim) != after.sizes.get(dim):
            raise LayoutError(
                f"the two captures differ along {dim} ({before.sizes.get(dim)} vs {after.sizes.get(dim)}): "
                "compare captures of the same input, layers and steps"
            )


def redistribution(
    before: xr.Dataset,
    after: xr.Dataset,
    target: str | Sequence[str],
    *,
    mask: xr.DataArray | np.ndarray | None = None,
) -> xr.Dataset:
    """Entropy, peak-to-background and mass inside a mask of the target word's map, in both captures.

    Args:
        before: a capture holding ``cross`` and ``word``.
        after: a capture of the same input (same image grid, layers, samples, steps); the
            prompts may differ (appended magnets).
        target: the target word (or ``"word1 word2"``), or one per sample.
        mask: the object's mask, over ``query`` or over ``y, x`` (optionally ``sample``) at the
            token grid or an integer multiple of it (pixels: inside when half a token is).

    Returns:
        A Dataset, lazy when the inputs are, with ``entropy``, ``peak_to_background`` and, with
        a mask, ``mass_inside`` and ``mass_outside``, each ``(run, …, layer)`` with
        ``run = before, after``, and ``change_<name>`` = after − before ``(…, layer)``.
    """
    _check_pair(before, after)
    maps = xr.concat([target_map(before, target), target_map(after, target)], dim="run")
    maps = maps.assign_coords(run=list(RUNS))
    p = maps / maps.sum("query")
    plogp = xr.where(p > 0, p * np.log(p.where(p > 0)), 0.0)
    median = (maps.chunk({"query": -1}) if maps.chunks else maps).median("query")
    out = xr.Dataset({"entropy": -plogp.sum("query"), "peak_to_background": maps.max("query") / median})
    if mask is not None:
        inside = query_mask(before, mask)
        out["mass_inside"] = (p * inside).sum("query")
        out["mass_outside"] = 1.0 - out["mass_inside"]
    for name in list(out.data_vars):
        out[f"change_{name}"] = out[name].sel(run="after", drop=True) - out[name].sel(run="before", drop=True)
    out.attrs = {"target": target if isinstance(target, str) else list(target)}
    return carry_coords(out, before)


def destinations(ds: xr.Dataset) -> xr.DataArray:
    """The transport destination of every text token, ``kind:word`` (``pad:<pad>`` for unnamed tokens)."""
    require(ds, "token_kind", "token_str", "word", analysis="destinations")
    kinds = np.asarray(ds["token_kind"].values).astype(str).astype(object)
    words = np.asarray(ds["word"].values).astype(str).astype(object)
    tokens = np.asarray(ds["token_str"].values).astype(str).astype(object)
    names = np.where(words != "", words, tokens)
    return xr.DataArray(kinds + ":" + names, dims=ds["token_kind"].dims)


def transport(
    before: xr.Dataset, after: xr.Dataset, *, mask: xr.DataArray | np.ndarray | None = None
) -> xr.Dataset:
    """Where the background queries' attention goes: mean mass per query to each destination, both runs.

    Args:
        before: a capture holding ``cross`` and token labels.
        after: a capture of the same input, its prompt possibly extended.
        mask: the object's mask; background = the image queries outside it (all without one).

    Returns:
        A Dataset with ``before``, ``after`` and ``change`` ``(…, layer, destination)``, lazy when
        the inputs are; ``destination`` lists every ``kind:word`` of either capture, then
        ``image``. ``.to_dataframe()`` gives the tidy table.
    """
    _check_pair(before, after)
    labels = [destinations(before), destinations(after)]
    names = list(dict.fromkeys(sorted(set(np.concatenate([lab.values.ravel() for lab in labels])))))
    background = None if mask is None else ~query_mask(before, mask)
    per_run = []
    for ds, lab in zip((before, after), labels, strict=True):
        cross = ds["cross"].reset_coords(drop=True)
        if background is None:
            rows = cross.mean("query", skipna=False)
        else:
            weight = background / background.sum("query")
            rows = xr.dot(cross, weight.astype(np.float32), dim="query")
        rows = mean_heads(rows)
        text = xr.dot(rows, one_hot(lab, "destination", names), dim="key_text")
        image = (1.0 - rows.sum("key_text")).expand_dims(destination=["image"])
        per_run.append(xr.concat([text, image], dim="destination"))
    out = xr.Dataset({"before": per_run[0], "after": per_run[1]})
    out["change"] = out["after"] - out["before"]
    return carry_coords(out, before)
