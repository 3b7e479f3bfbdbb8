"""Referring-segmentation metrics against independent oracles.

IoU is checked against pycocotools' mask IoU (the COCO API that RefCOCO evaluations use) and
torchmetrics' binary Jaccard index; J&F against a transcription of the DAVIS 2017 toolkit's
``db_eval_iou`` / ``f_measure`` (``seg2bmap`` boundaries, disk dilation), which shares no code with
:mod:`attnlens.analysis.metrics` (that one matches boundaries by a distance transform).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr
from scipy import ndimage

from attnlens.analysis.metrics import boundary_f, iou, j_and_f, referring_summary

mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools (the dev extra) is the IoU oracle")
tm = pytest.importorskip(
    "torchmetrics.functional.classification", reason="torchmetrics is the Jaccard oracle"
)


def mask_pairs(n_random: int = 200, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, prediction, target)`` bool pairs: random ones of every density and size, and the
    adversarial ones: empty, full, one pixel, thin lines, touching the borders."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n_random):
        h, w = (int(v) for v in rng.integers(1, 48, size=2))
        density = rng.choice([0.01, 0.1, 0.5, 0.9, 0.99])
        pred = rng.random((h, w)) < density
        target = rng.random((h, w)) < rng.choice([0.05, 0.5, 0.95])
        if i % 4 == 0:  # overlapping blobs rather than salt and pepper
            pred = ndimage.binary_dilation(pred, iterations=2)
        pairs.append((f"random {i}", pred, target))
    h, w = 17, 23
    empty, full = np.zeros((h, w), bool), np.ones((h, w), bool)
    pixel = empty.copy()
    pixel[8, 11] = True
    corner = empty.copy()
    corner[-1, -1] = True
    row, column, diagonal = empty.copy(), empty.copy(), np.eye(h, w, dtype=bool)
    row[5, :] = True
    column[:, 0] = True
    border = full.copy()
    border[1:-1, 1:-1] = False
    chess = (np.indices((h, w)).sum(0) % 2).astype(bool)
    shapes = {
        "empty": empty, "full": full, "pixel": pixel, "corner pixel": corner, "row": row,
        "first column": column, "diagonal": diagonal, "frame": border, "checkerboard": chess,
    }  # fmt: skip
    for a, m in shapes.items():
        for b, t in shapes.items():
            pairs.append((f"{a} vs {b}", m, t))
    one_by_one = [(f"1×1 {p:d}{t:d}", np.array([[p]]), np.array([[t]])) for p in (0, 1) for t in (0, 1)]
    return pairs + one_by_one


PAIRS = mask_pairs()


def ours(pred: np.ndarray, target: np.ndarray) -> float:
    return float(
        iou(xr.DataArray(pred, dims=("y", "x")), xr.DataArray(target, dims=("y", "x")), dims=("y", "x"))
    )


def test_there_are_over_200_pairs_with_every_adversarial_case():
    assert len(PAIRS) >= 200 + 81
    assert sum(not (p | t).any() for _, p, t in PAIRS) >= 2  # both empty


def test_iou_agrees_with_pycocotools_mask_iou():
    for name, pred, target in PAIRS:
        rle = [mask_api.encode(np.asfortranarray(m.astype(np.uint8))) for m in (pred, target)]
        coco = float(mask_api.iou([rle[0]], [rle[1]], [0])[0, 0])
        if not (pred | target).any():  # COCO scores two empty masks 0; DAVIS and attnlens score them 1
            assert coco == 0.0 and ours(pred, target) == 1.0, name
            continue
        assert abs(ours(pred, target) - coco) <= 1e-9, name


def test_iou_agrees_with_torchmetrics_binary_jaccard():
    """torchmetrics divides its integer counts in float32: equal to float32 rounding, and its
    confusion matrix equal to the counts exactly."""
    for name, pred, target in PAIRS:
        p, t = torch.as_tensor(pred).long().ravel(), torch.as_tensor(target).long().ravel()
        jaccard = float(tm.binary_jaccard_index(p, t, zero_division=1.0))
        assert abs(ours(pred, target) - jaccard) <= 2 * np.finfo(np.float32).eps, name
        confusion = tm.binary_confusion_matrix(p, t)
        assert int(confusion[1, 1]) == int((pred & target).sum()), name
        assert int(confusion.sum() - confusion[0, 0]) == int((pred | target).sum()), name


# -- the DAVIS 2017 toolkit's definitions, transcribed ------------------------------------------------


def davis_seg2bmap(seg: np.ndarray) -> np.ndarray:
    seg = seg.astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def davis_disk(radius: float) -> np.ndarray:  # skimage.morphology.disk
    r = int(radius)
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return x**2 + y**2 <= r**2


def davis_f(foreground: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(foreground.shape))
    fg_boundary, gt_boundary = davis_seg2bmap(foreground), davis_seg2bmap(gt)
    fg_dil = ndimage.binary_dilation(fg_boundary, davis_disk(bound_pix))
    gt_dil = ndimage.binary_dilation(gt_boundary, davis_disk(bound_pix))
    gt_match, fg_match = gt_boundary * fg_dil, fg_boundary * gt_dil
    n_fg, n_gt = np.sum(fg_boundary), np.sum(gt_boundary)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision, recall = np.sum(fg_match) / float(n_fg), np.sum(gt_match) / float(n_gt)
    return 0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_j(annotation: np.ndarray, segmentation: np.ndarray) -> float:
    inters, union = np.sum(segmentation & annotation), np.sum(segmentation | annotation)
    return 1.0 if np.isclose(union, 0) else inters / union


def test_boundary_f_is_the_davis_toolkits_on_every_pair():
    for tolerance in (0.008, 0.05, 0.2):
        for name, pred, target in PAIRS:
            assert abs(boundary_f(pred, target, tolerance) - davis_f(pred, target, tolerance)) <= 1e-12, name


def test_j_and_f_of_clips_is_the_mean_over_frames_of_the_davis_measures():
    rng = np.random.default_rng(1)
    for clip in range(20):
        frames, h, w = int(rng.integers(1, 6)), int(rng.integers(8, 60)), int(rng.integers(8, 60))
        target = np.zeros((frames, h, w), bool)
        for f in range(frames):  # a moving box, sometimes absent
            if rng.random() < 0.8:
                y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
                target[f, y : y + int(rng.integers(2, h - y)), x : x + int(rng.integers(2, w - x))] = True
        pred = np.roll(target, int(rng.integers(-3, 4)), axis=2) | (rng.random(target.shape) < 0.02)
        got = j_and_f(pred, target)
        j = np.mean([davis_j(t, p) for p, t in zip(pred, target, strict=True)])
        f = np.mean([davis_f(p, t) for p, t in zip(pred, target, strict=True)])
        assert got["J"] == pytest.approx(j, abs=1e-12) and got["F"] == pytest.approx(f, abs=1e-12), clip
        assert got["J&F"] == pytest.approx((j + f) / 2, abs=1e-12)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        j_and_f(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5), bool))
    with pytest.raises(ValueError, match="one shape"):
        boundary_f(np.zeros((4, 4), bool), np.zeros((3, 4), bool))


def test_referring_summary_matches_its_definitions_on_random_counts():
    rng = np.random.default_rng(2)
    union = rng.integers(1, 1000, size=300)
    inter = (union * rng.random(300)).astype(int)
    s = referring_summary(inter, union)
    ious = inter / union
    assert s["n"] == 300 and s["mIoU"] == pytest.approx(ious.mean(), abs=1e-12)
    assert s["oIoU"] == pytest.approx(inter.sum() / union.sum(), abs=1e-12)
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        assert s[f"P@{t:g}"] == pytest.approx(np.mean(ious >= t), abs=1e-12)
    assert math.isclose(referring_summary([0], [0])["mIoU"], 1.0)
    with pytest.raises(ValueError, match="no expression"):
        referring_summary([], [])
