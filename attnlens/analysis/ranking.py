"""Ranking layers, heads and steps by how well the target word's map localises the object.

For every sample, step, layer and head, the target word's map (``cross`` summed over the
target's tokens, over the image tokens ``query``) is scored against the sample's ground-truth
mask with :mod:`attnlens.analysis.metrics`: IoU after thresholding the map at ``threshold`` of
its own range, the pointing game, and ROC AUC. :func:`rank` then aggregates the scores over a
dataset of samples (and any other dimension) and orders layers, heads or steps from the evidence.

>>> import numpy as np
>>> from attnlens.analysis import synthetic, localisation_scores, rank
>>> ds = synthetic.planted(layers=3, heads=2, steps=1, grid=(4, 4))
>>> mask = np.zeros((4, 4), bool); mask[:2, :2] = True
>>> scores = localisation_scores(ds, mask, "mug")
>>> scores.auc.dims
('sample', 'step', 'layer', 'head')
>>> list(rank(scores, by="layer", metric="auc").columns)
['layer', 'mean', 'sem', 'n', 'rank']
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from ..errors import MissingVariableError
from ._common import carry_coords, query_mask, require, target_tokens
from .metrics import auc, binarize, iou, pointing_game

__all__ = ["METRICS", "localisation_scores", "rank"]

METRICS = ("iou", "pointing_game", "auc")


def localisation_scores(
    ds: xr.Dataset,
    masks: xr.DataArray | np.ndarray,
    targets: str | Sequence[str] | xr.DataArray,
    *,
    threshold: float = 0.5,
) -> xr.Dataset:
    """IoU, pointing game and AUC of every head's target map against the ground-truth masks.

    Args:
        ds: a capture or store holding ``cross`` (``sample``, ``step`` optional).
        masks: ground truth per sample: ``(sample, y, x)`` or ``(y, x)`` for all, at the token
            grid or an integer multiple of it, or a DataArray over ``query``.
        targets: the target word for every sample, one per sample (``"red mug"`` selects both
            words), or a ``(sample, key_text)`` boolean token selection.
        threshold: fraction of each map's range at which it is binarised for IoU (0.5).

    Returns:
        A Dataset of ``iou``, ``pointing_game`` and ``auc``, each ``(sample, step, layer, head)``
        (the dims ``ds`` has), lazy when ``ds`` is.
    """
    require(ds, "cross", analysis="localisation_scores")
    cross = ds["cross"].reset_coords(drop=True)
    maps = xr.dot(cross, target_tokens(ds, targets), dim="key_text")
    if maps.chunks:
        maps = maps.chunk({"query": -1})
    truth = query_mask(ds, masks)
    out = xr.Dataset(
        {
            "iou": iou(binarize(maps, threshold), truth),
            "pointing_game": pointing_game(maps, truth),
            "auc": auc(maps, truth),
        }
    )
    dims = [d for d in ("sample", "step", "layer", "head") if d in out.dims]
    out = out.transpose(*dims, ...)
    out.attrs = {"threshold": threshold}
    return carry_coords(out, ds)


def rank(scores: xr.Dataset, by: str | Sequence[str] = "layer", metric: str = "iou") -> pd.DataFrame:
    """Order layers, heads or steps by their mean score over everything else (samples first).

    Args:
        scores: the result of :func:`localisation_scores`.
        by: the dimension(s) or step coordinate to rank (``"layer"``, ``("layer", "head")``,
            ``"step"``, ``"timestep"``).
        metric: ``"iou"``, ``"pointing_game"`` or ``"auc"``.

    Returns:
        columns ``*by, mean, sem, n, rank`` (rank 1 = best), best first; NaN scores (an empty
        mask) are left out of ``mean`` and counted out of ``n``.
    """
    if metric not in scores:
        raise MissingVariableError(f"no metric {metric!r} in the scores; choose from {', '.join(METRICS)}")
    keys = [by] if isinstance(by, str) else list(by)
    values = scores[metric]
    for key in keys:
        if key not in values.dims and key not in values.coords:
            raise MissingVariableError(
                f"cannot rank by {key!r}: the scores have dims {', '.join(values.dims)}"
            )
    frame = values.compute().to_dataframe().reset_index()
    grouped = frame.groupby(keys, sort=False)[metric]
    table = pd.DataFrame({"mean": grouped.mean(), "sem": grouped.sem(), "n": grouped.count()}).reset_index()
    table = table.sort_values("mean", ascending=False, kind="stable").reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1)
    return table
