"""Localisation metrics of heatmaps against masks, over named dimensions, lazily where the input is.

Every function reduces the dimensions ``dims`` (default ``("query",)``, the image tokens of a
capture; ``("y", "x")`` for spatial maps) and broadcasts over the others, so one call scores
every sample, step, layer and head at once.

- :func:`iou`: intersection over union of two boolean masks; 1 when both are empty (the DAVIS
  convention for the region similarity J).
- :func:`binarize`: a heatmap thresholded at a fraction of its own range:
  ``(h − min) / (max − min) ≥ threshold``.
- :func:`pointing_game`: 1 when the heatmap's maximum lies inside the mask (Zhang et al., "Top-down
  Neural Attention by Excitation Backprop", ECCV 2016; ties count as hits, no tolerance
  radius); NaN for an empty mask.
- :func:`auc`: area under the ROC curve of the heatmap's values as scores for mask membership,
  the Mann–Whitney statistic ``(R₊ − n₊(n₊+1)/2) / (n₊ n₋)`` with average ranks for ties; NaN
  when the mask is empty or full.

>>> import numpy as np, xarray as xr
>>> heat = xr.DataArray(np.array([[0.1, 0.2], [0.9, 0.4]]), dims=("y", "x"))
>>> mask = xr.DataArray(np.array([[False, False], [True, False]]), dims=("y", "x"))
>>> float(iou(binarize(heat, 0.5, dims=("y", "x")), mask, dims=("y", "x")))
1.0
>>> float(pointing_game(heat, mask, dims=("y", "x"))), float(auc(heat, mask, dims=("y", "x")))
(1.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

__all__ = ["auc", "binarize", "iou", "otsu_threshold", "pointing_game"]

Dims = str | Sequence[str]


def _dims(dims: Dims) -> list[str]:
    return [dims] if isinstance(dims, str) else list(dims)


def binarize(heatmap: xr.DataArray, threshold: float = 0.5, *, dims: Dims = ("query",)) -> xr.DataArray:
    """``heatmap`` min–max normalised over ``dims`` and thresholded: bool, same dims.

    A constant heatmap has no range and is all False.
    """
    d = _dims(dims)
    low, high = heatmap.min(d), heatmap.max(d)
    return ((heatmap - low) >= threshold * (high - low)) & (high > low)


def iou(pred: xr.DataArray, target: xr.DataArray, *, dims: Dims = ("query",)) -> xr.DataArray:
    """Intersection over union of boolean ``pred`` and ``target`` over ``dims``; 1 when both are empty."""
    d = _dims(dims)
    pred, target = pred.astype(bool), target.astype(bool)
    inter = (pred & target).sum(d)
    union = (pred | target).sum(d)
    return xr.where(union > 0, inter / union.where(union > 0), 1.0).rename("iou")


def pointing_game(heatmap: xr.DataArray, mask: xr.DataArray, *, dims: Dims = ("query",)) -> xr.DataArray:
    """1 when the maximum of ``heatmap`` over ``dims`` lies inside ``mask``, else 0; NaN for an empty mask."""
    d = _dims(dims)
    mask = mask.astype(bool)
    inside = heatmap.where(mask).max(d)
    outside = heatmap.where(~mask).max(d)
    hit = (inside >= outside.fillna(-np.inf)).astype(float)
    return hit.where(mask.any(d)).rename("pointing_game")


def auc(heatmap: xr.DataArray, mask: xr.DataArray, *, dims: Dims = ("query",)) -> xr.DataArray:
    """ROC AUC of ``heatmap`` as a score for ``mask`` over ``dims`` (Mann–Whitney); NaN if empty or full."""
    d = _dims(dims)
    ranks = xr.apply_ufunc(
        _ranks,
        heatmap,
        input_core_dims=[d],
        output_core_dims=[d],
        kwargs={"n_core": len(d)},
        dask="parallelized",
        output_dtypes=[np.float64],
    )
    mask = mask.astype(bool)
    pos = mask.sum(d)
    neg = int(np.prod([heatmap.sizes[x] for x in d])) - pos
    rank_sum = ranks.where(mask).sum(d)
    value = (rank_sum - pos * (pos + 1) / 2) / (pos * neg)
    return value.where((pos > 0) & (neg > 0)).rename("auc")


def _ranks(values: np.ndarray, n_core: int) -> np.ndarray:
    """Average ranks (1-based) over the ``n_core`` trailing axes, where apply_ufunc puts the core dims."""
    from scipy.stats import rankdata  # scipy.stats takes a while to import: only when ranking

    lead = values.shape[: values.ndim - n_core]
    return rankdata(values.reshape(*lead, -1), axis=-1).reshape(values.shape)


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of ``values`` (any shape); the minimum when they are constant.

    >>> otsu_threshold(np.array([0.0, 0.1, 0.9, 1.0])) < 0.9
    True
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    # the threshold is the right edge of the best class split, so that the top class is never empty
    return float(edges[int(np.argmax(w0 * w1 * (m0 - m1) ** 2)) + 1])
