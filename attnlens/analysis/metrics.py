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
- :func:`boundary_f` and :func:`j_and_f`: the DAVIS video measures of masks ``(…, H, W)``: the
  boundary F-measure (Perazzi et al., CVPR 2016: boundary pixels matched within
  ``tolerance`` × the image diagonal) and the mean of J (region IoU) and F over frames.
- :func:`mask_scores`: intersection, union and IoU of each predicted mask against its target,
  and :func:`referring_summary` the referring-segmentation table of them: mIoU, oIoU and
  precision at IoU thresholds 0.5 … 0.9.
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

__all__ = [
    "PRECISION_THRESHOLDS",
    "auc",
    "binarize",
    "boundary_f",
    "iou",
    "j_and_f",
    "otsu_threshold",
    "pointing_game",
    "referring_summary",
]

#: IoU thresholds of the precision columns in referring-segmentation tables (P@0.5 … P@0.9)
PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)

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


def _boundary(mask: np.ndarray) -> np.ndarray:
    """DAVIS' boundary map (``seg2bmap``): pixels that differ from their right, lower or lower-right
    neighbour; on the last row (column) only a change along that row (column) counts, so the image
    border itself is never a boundary."""
    padded = np.pad(mask, ((0, 1), (0, 1)))
    right, down, diagonal = padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]
    edge = (mask != right) | (mask != down) | (mask != diagonal)
    # on the last row and column DAVIS compares along the edge only, and never marks the corner
    edge[-1, :] = mask[-1, :] != right[-1, :]
    edge[:, -1] = mask[:, -1] != down[:, -1]
    edge[-1, -1] = False
    return edge


def boundary_f(pred: np.ndarray, target: np.ndarray, tolerance: float = 0.008) -> float:
    """Boundary F-measure of two ``(H, W)`` bool masks: 1 when both are empty, 0 when one is.

    The DAVIS definition (Perazzi et al., CVPR 2016, and the DAVIS 2017 toolkit): boundaries as
    ``seg2bmap`` draws them, and a boundary pixel of one mask matched when a boundary pixel of
    the other lies within ``ceil(tolerance · diagonal)`` pixels (a disk, Euclidean).

    >>> square = np.zeros((20, 20), bool); square[5:15, 5:15] = True
    >>> boundary_f(square, square), boundary_f(square, np.roll(square, 3, axis=1))
    (1.0, 0.5)
    """
    from scipy import ndimage

    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(
            f"boundary_f takes two (H, W) masks of one shape; got {pred.shape} and {target.shape}"
        )
    bp, bt = _boundary(pred), _boundary(target)
    if not bp.any() and not bt.any():
        return 1.0
    if not bp.any() or not bt.any():
        return 0.0
    radius = np.ceil(tolerance * np.hypot(*pred.shape))
    near_t = ndimage.distance_transform_edt(~bt) <= radius
    near_p = ndimage.distance_transform_edt(~bp) <= radius
    precision = (bp & near_t).sum() / bp.sum()
    recall = (bt & near_p).sum() / bt.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def j_and_f(pred: np.ndarray, target: np.ndarray, tolerance: float = 0.008) -> dict[str, float]:
    """DAVIS' J (region IoU), F (:func:`boundary_f`) and their mean J&F over the frames of
    ``(frame, H, W)`` bool masks."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"j_and_f takes two (frame, H, W) masks of one shape; got {pred.shape} and {target.shape}"
        )
    inter, union = (pred & target).sum((1, 2)), (pred | target).sum((1, 2))
    j = float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))
    f = float(np.mean([boundary_f(p, t, tolerance) for p, t in zip(pred, target, strict=True)]))
    return {"J": j, "F": f, "J&F": (j + f) / 2}


def referring_summary(intersection: Sequence[float], union: Sequence[float]) -> dict[str, float]:
    """The referring-segmentation scores of per-expression pixel counts ``(expression,)``.

    ``mIoU`` is the mean of per-expression IoU (1 where prediction and target are both empty),
    ``oIoU`` the cumulative intersection over the cumulative union, and ``P@τ`` the share of
    expressions whose IoU reaches ``τ`` for τ in :data:`PRECISION_THRESHOLDS`; all in ``[0, 1]``
    (papers print them × 100). ``n`` counts the expressions.

    >>> s = referring_summary([50, 0, 30], [100, 40, 30])
    >>> s["n"], round(s["mIoU"], 4), round(s["oIoU"], 4), s["P@0.5"], s["P@0.9"]
    (3, 0.5, 0.4706, 0.6666666666666666, 0.3333333333333333)
    """
    inter = np.asarray(intersection, dtype=np.float64)
    union_ = np.asarray(union, dtype=np.float64)
    if inter.shape != union_.shape or inter.ndim != 1:
        raise ValueError(
            f"intersection and union are (expression,) counts; got {inter.shape} and {union_.shape}"
        )
    if not len(inter):
        raise ValueError("no expression to summarise")
    ious = np.where(union_ > 0, inter / np.maximum(union_, 1), 1.0)
    out: dict[str, float] = {
        "n": len(ious),
        "mIoU": float(ious.mean()),
        "oIoU": float(inter.sum() / union_.sum()) if union_.sum() else 1.0,
    }
    out.update({f"P@{t:g}": float((ious >= t).mean()) for t in PRECISION_THRESHOLDS})
    return out
