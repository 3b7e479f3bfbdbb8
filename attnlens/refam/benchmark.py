"""Score RefAM, its ablations and attention-free baselines on ShapesRef's referring expressions.

Each variant is a set of :class:`~attnlens.refam.RefamOptions` overrides on top of options
shared by all (an embedded model's card-chosen options, else :data:`SHAPESREF_OPTIONS`);
:data:`VARIANTS` holds full RefAM, one ablation per step, RefAM on the head noun alone, and the
attention-only baselines: the target words' (and the head noun's) raw head-mean map averaged
over layers, thresholded with Otsu's method: no appended magnets, no GAS handling, no prior, no
refinement. Masks are scored against the exact target masks: IoU per expression (mean: mIoU),
cumulative intersection over cumulative union (oIoU), and the pointing game on the heatmap.

    python benchmarks/refam_shapesref.py      # the table in BENCHMARKS.md
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..analysis.metrics import j_and_f
from ..datasets import shapesref
from .image import segment
from .video import segment_video

__all__ = ["SHAPESREF_OPTIONS", "VARIANTS", "evaluate", "summarise", "video_scores"]

#: RefAM's options for an embedded model whose card chose none (no ``refam.json``), chosen for the
#: first shapes-flux on v1's val split (200 expressions): the noun phrase's content words (mIoU
#: 0.239 at t = 0.3) over the head noun alone (0.159), and t = 0.3 over 0.5 (0.235).
SHAPESREF_OPTIONS: dict[str, Any] = {"targets": "phrase", "t": 0.3}

_RAW = {"append_magnets": False, "gas": "none", "spatial_prior": False, "refine": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "RefAM": {},
    "no magnet filtering": {"filter_magnets": False},
    "no GAS handling": {"gas": "none"},
    "no appended magnets": {"append_magnets": False},
    "no spatial prior": {"spatial_prior": False},
    "no refinement": {"refine": False},
    "RefAM, head noun": {"targets": "head"},
    "attention only": _RAW,
    "attention only, head noun": {**_RAW, "targets": "head"},
}


def evaluate(
    model: Any,
    pairs: Iterable[tuple[shapesref.Scene, shapesref.Expression]],
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    segmenter: Any = None,
    progress: bool = True,
    **options: Any,
) -> pd.DataFrame:
    """Segment every expression with every variant.

    Args:
        model: what :func:`~attnlens.refam.segment` takes (a ShapesPipeline or its zoo name).
        pairs: ``(scene, expression)`` pairs, e.g. ``shapesref.expressions("test")``.
        variants: name → option overrides (default :data:`VARIANTS`).
        segmenter: passed to :func:`~attnlens.refam.segment`.
        **options: options shared by every variant (a variant's own overrides win).

    Returns:
        one row per (variant, expression): ``variant``, ``sample``, ``text``, ``kind``,
        ``same_colour_distractor``, ``intersection``, ``union``, ``iou``, ``pointing``, plus the
        attention-free :func:`~attnlens.datasets.shapesref.baselines` as variants without ``pointing``.
    """
    pairs = list(pairs)
    variants = VARIANTS if variants is None else variants
    model, patch = _resolved(model)
    rows = []
    bar = tqdm(total=len(pairs) * len(variants), desc="RefAM", disable=not progress)
    for i, (scene, e) in enumerate(pairs):
        target = scene.masks[e.target]
        for name, overrides in variants.items():
            chosen = {**options, **overrides}
            result = segment(scene.image, e.text, model=model, segmenter=segmenter, **chosen)
            peak = np.unravel_index(np.argmax(result.heatmap), result.heatmap.shape)
            rows.append(_row(name, i, e, result.mask, target, pointing=float(target[peak])))
            bar.update()
    bar.close()
    for name, masks in shapesref.baselines(pairs, patch).items():
        for i, ((s, e), mask) in enumerate(zip(pairs, masks, strict=True)):
            rows.append(_row(name, i, e, mask, s.masks[e.target]))
    return pd.DataFrame(rows)


def summarise(rows: pd.DataFrame, subsets: bool = True) -> pd.DataFrame:
    """mIoU, oIoU and pointing per variant, on all expressions and (``subsets``) on the
    same-colour-distractor ones and per expression kind, in the variants' order."""
    groups = {"all": slice(None)}
    if subsets:
        groups["same-colour distractor"] = rows.same_colour_distractor
        groups.update({kind: rows.kind == kind for kind in rows.kind.unique()})
    out = []
    for subset, sel in groups.items():
        part = rows[sel] if not isinstance(sel, slice) else rows
        for variant, g in part.groupby("variant", sort=False):
            out.append(
                dict(
                    variant=variant,
                    subset=subset,
                    n=len(g),
                    mIoU=g.iou.mean(),
                    oIoU=g.intersection.sum() / max(g.union.sum(), 1),
                    pointing=g.pointing.mean(),
                )
            )
    return pd.DataFrame(out)


def video_scores(
    model: Any,
    pairs: Iterable[tuple[shapesref.Video, shapesref.Expression]],
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    segmenter: Any = None,
    progress: bool = True,
    **options: Any,
) -> pd.DataFrame:
    """J, F and J&F (mean over expressions of the per-video scores) of each variant on video
    expressions, beside the baselines of :func:`~attnlens.datasets.shapesref.baselines` drawn
    frame by frame.

    Args:
        model: what :func:`~attnlens.refam.segment_video` takes.
        pairs: ``(video, expression)`` pairs, e.g. ``shapesref.expressions("test", 100, video=True)``.
        variants: name → option overrides (default: ``RefAM`` and the attention-only baselines).
    """
    pairs = list(pairs)
    variants = variants or {k: VARIANTS[k] for k in ("RefAM", "attention only", "attention only, head noun")}
    model, patch = _resolved(model)
    scores: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    bar = tqdm(total=len(pairs) * len(variants), desc="RefAM video", disable=not progress)
    for video, e in pairs:
        target = video.masks[:, e.target]
        for name, overrides in variants.items():
            clip = segment_video(
                video.frames, e.text, model=model, segmenter=segmenter, **{**options, **overrides}
            )
            scores[name].append(j_and_f(clip.masks, target))
            bar.update()
    bar.close()
    for video, e in pairs:
        frames = [(_frame(video, t), e) for t in range(len(video.frames))]
        for name, masks in shapesref.baselines(frames, patch).items():
            scores.setdefault(name, []).append(j_and_f(masks, video.masks[:, e.target]))
    return pd.DataFrame(
        [{"variant": name, "n": len(s), **pd.DataFrame(s).mean().to_dict()} for name, s in scores.items()]
    )


def _resolved(model: Any) -> tuple[Any, int]:
    """A zoo name loaded once (not once per expression), and the pixels per token of the
    token-grid ceiling baseline (the embedded model's patch; 8 for other models)."""
    if isinstance(model, str):
        from .. import zoo

        model = zoo.load(model)
    return model, getattr(getattr(model, "config", None), "patch", 8)


def _frame(v: shapesref.Video, t: int) -> shapesref.Scene:
    """Frame ``t`` of a video as a still scene, for the baselines drawn frame by frame."""
    return shapesref.Scene(
        v.frames[t], v.masks[t], v.objects, v.background, v.textured, v.caption, v.expressions
    )


def _row(
    variant: str,
    i: int,
    e: shapesref.Expression,
    mask: np.ndarray,
    target: np.ndarray,
    pointing: float = np.nan,
) -> dict[str, Any]:
    inter, union = int((mask & target).sum()), int((mask | target).sum())
    return dict(
        variant=variant,
        sample=i,
        text=e.text,
        kind=e.kind,
        same_colour_distractor=e.has_same_colour_distractor,
        intersection=inter,
        union=union,
        iou=inter / union if union else 1.0,
        pointing=pointing,
    )
