"""RefAM refinement: a heatmap and its points → a mask, by threshold or by a SAM-family segmenter.

- :func:`threshold_refine`: Otsu's threshold of the heatmap, then one connected component;
- :func:`region_segmenter`: a model-free point-prompted segmenter for scenes of flat-coloured
  objects (the embedded world), the connected region of the prompt pixel's colour;
- image segmenters, prompted with the points of one image: ``transformers``' ``(SamModel,
  SamProcessor)`` and ``(Sam2Model, Sam2Processor)`` (one code path: the processors differ only
  in how deep they nest the points and whether masks are cut out of padding), or a callable
  ``(image (H, W, 3) uint8, points (n, 2) xy, labels (n,)) -> (H, W) bool``;
- the video segmenter ``(Sam2VideoModel, Sam2VideoProcessor)``: prompted with the points of one
  frame, it propagates the object forwards and backwards through the clip.

Every segmenter returns its best-scoring candidate at the input's size. :func:`best_proposal`
prompts a segmenter at many points, one at a time, and keeps the mask the heatmap favours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..analysis.metrics import otsu_threshold
from .errors import SegmenterMismatchError

__all__ = [
    "REFINERS",
    "Segmenter",
    "VideoSegmenter",
    "best_proposal",
    "image_segmenter",
    "refine",
    "region_segmenter",
    "threshold_refine",
    "video_segmenter",
]

#: ``(image (H, W, 3) uint8, points (n, 2) xy, labels (n,)) -> (H, W) bool``
Segmenter = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
#: ``(frames (T, H, W, 3) uint8, frame index, points (n, 2) xy, labels (n,)) -> (T, H, W) bool``
VideoSegmenter = Callable[[np.ndarray, int, np.ndarray, np.ndarray], np.ndarray]

_PAIRS = "(SamModel, SamProcessor) or (Sam2Model, Sam2Processor)"
#: the model-free refiners: ``"threshold"`` (:func:`threshold_refine`, prompted by no point) and
#: ``"region"`` (:func:`region_segmenter`)
REFINERS = ("threshold", "region")


def threshold_refine(heat: np.ndarray, component: str, peak: tuple[float, float] | None) -> np.ndarray:
    """``(H, W)`` heat → ``(H, W)`` bool: Otsu's threshold, then the largest component or the one at ``peak``.

    ``peak`` is an ``(x, y)`` pixel position (the strongest positive point); ``component`` is
    ``"largest"`` or ``"peak"``.

    >>> heat = np.zeros((4, 6)); heat[1:3, 0:2] = 1.0; heat[0:4, 3:6] = 0.9
    >>> [int(threshold_refine(heat, c, (0.5, 1.5)).sum()) for c in ("largest", "peak")]
    [12, 4]
    """
    from scipy import ndimage

    mask = heat >= otsu_threshold(heat)
    labelled, n = ndimage.label(mask)
    if n <= 1:
        return mask
    if component == "peak" and peak is not None:
        r = min(int(peak[1]), heat.shape[0] - 1)
        c = min(int(peak[0]), heat.shape[1] - 1)
        if labelled[r, c]:
            return labelled == labelled[r, c]
    sizes = np.bincount(labelled.ravel())[1:]
    return labelled == (int(np.argmax(sizes)) + 1)


def region_segmenter(tolerance: int = 24) -> Segmenter:
    """A point-prompted segmenter that needs no model, for scenes of flat-coloured objects.

    Each positive point selects the connected region of pixels whose colour lies within
    ``tolerance`` grey levels (in every channel) of the pixel under the point; the mask is the
    union of those regions, less the regions of negative points. On the embedded world it plays
    SAM's part (an object's pixels all carry its colour; the default tolerance is twice the
    speckle amplitude of a textured background, so that a background stays one region); on
    photographs use SAM. A point on the background selects the background, as SAM would.

    >>> rgb = np.zeros((6, 8, 3), dtype=np.uint8); rgb[1:4, 1:4] = (220, 40, 40); rgb[2:5, 5:8] = 200
    >>> seg = region_segmenter()
    >>> int(seg(rgb, np.array([[2.5, 2.5]]), np.array([1])).sum())  # the red square, (x, y) = (2.5, 2.5)
    9
    >>> int(seg(rgb, np.array([[0.5, 0.5], [6.5, 3.5]]), np.array([1, 1])).sum())  # background + grey
    39
    """
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be 0 or more grey levels")

    def run(rgb: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        pixels = np.asarray(rgb).astype(np.int16)
        h, w = pixels.shape[:2]
        mask = np.zeros((h, w), dtype=bool)
        for positive in (True, False):  # negatives last: they carve out what positives took
            for (x, y), label in zip(np.asarray(points), np.asarray(labels), strict=True):
                if bool(label) != positive:
                    continue
                r, c = min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)
                labelled, _ = ndimage.label(np.abs(pixels - pixels[r, c]).max(axis=-1) <= tolerance)
                region = labelled == labelled[r, c]
                mask = mask | region if positive else mask & ~region
        return mask

    return run


def best_proposal(rgb: np.ndarray, heat: np.ndarray, points: np.ndarray, segmenter: Segmenter) -> int:
    """Which of ``points`` ``(n, 2)`` xy, each prompting ``segmenter`` alone, gives the mask of
    highest mean ``heat`` ``(H, W)``: the heatmap chooses among the segmenter's proposals (as SAM's
    automatic mask generator prompts a grid of points), rather than at its single hottest pixel,
    which can lie just off the object its heat surrounds.

    >>> rgb = np.zeros((4, 8, 3), dtype=np.uint8); rgb[:, :3] = 200; rgb[:, 5:] = 90
    >>> heat = np.zeros((4, 8)); heat[:, 3] = 1.0; heat[:, 5:] = 0.6  # the peak lies between them
    >>> best_proposal(rgb, heat, np.array([[1.5, 2], [3.5, 2], [6.5, 2]]), region_segmenter())
    2
    """
    scores: dict[bytes, float] = {}
    best, best_score = 0, -np.inf
    for i, point in enumerate(np.asarray(points, dtype=np.float64).reshape(-1, 2)):
        mask = np.asarray(segmenter(rgb, point[None], np.ones(1, dtype=np.int64)), dtype=bool)
        key = np.packbits(mask).tobytes()
        if key not in scores:
            scores[key] = float(heat[mask].mean()) if mask.any() else -np.inf
        if scores[key] > best_score:
            best, best_score = i, scores[key]
    return best


def refine(
    rgb: np.ndarray,
    heat: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    segmenter: Segmenter | None,
    *,
    enabled: bool = True,
    component: str = "largest",
) -> tuple[np.ndarray, str]:
    """One image's mask ``(H, W)`` bool and the name of the refiner that made it.

    ``enabled=False`` is the "no refinement" ablation (Otsu's threshold alone, also when a
    segmenter is given). A segmenter's empty mask falls back to the threshold refiner: a silent
    empty mask is never returned.

    Raises:
        SegmenterMismatchError: the segmenter returned a mask of another size than ``heat``.
    """
    peak = tuple(points[0]) if len(points) else None
    if not enabled:
        return heat >= otsu_threshold(heat), "threshold only"
    if segmenter is None:
        return threshold_refine(heat, component, peak), f"otsu + {component} component"
    mask = np.asarray(segmenter(rgb, points, labels))
    if mask.shape != heat.shape:
        raise SegmenterMismatchError(
            f"the segmenter returned a mask of shape {mask.shape} for an image of {heat.shape}"
        )
    if not mask.any():
        return threshold_refine(heat, component, peak), "segmenter (empty) → otsu"
    return mask.astype(bool), "segmenter"


# -- image segmenters --------------------------------------------------------------------------------


def _sam(model: Any, processor: Any) -> Segmenter:
    """SAM or SAM2 prompted with points; the best-scoring of its multimask outputs at the image's size."""
    from transformers import Sam2Model, Sam2Processor, SamModel, SamProcessor

    sam2 = isinstance(model, Sam2Model) and isinstance(processor, Sam2Processor)
    if not sam2 and not (isinstance(model, SamModel) and isinstance(processor, SamProcessor)):
        raise SegmenterMismatchError(
            f"segmenter=(model, processor) takes {_PAIRS} from transformers; got "
            f"({type(model).__name__}, {type(processor).__name__})"
        )
    if sam2:  # SAM2 resizes to a square: its processor's size must be the model's input
        size = model.config.prompt_encoder_config.image_size
        given = getattr(processor.image_processor, "size", None) or {}
        kind = "resizes images to"
    else:  # SAM resizes the longest side and pads to a square: the padded size must be the model's input
        size = model.config.vision_config.image_size
        given = getattr(processor.image_processor, "pad_size", None) or {}
        kind = "pads images to"
    if given and (given.get("height"), given.get("width")) != (size, size):
        raise SegmenterMismatchError(
            f"the {type(processor).__name__} {kind} {given.get('height')} × {given.get('width')}, but the "
            f"{type(model).__name__} takes {size} × {size}: use the processor saved with the model"
        )

    # the image encoder is most of SAM's cost: a grid of prompts on one image encodes it once
    encoded: dict[str, Any] = {}

    @torch.no_grad()
    def run(rgb: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        nest = (lambda v: [[v]]) if sam2 else (lambda v: [v])  # SAM2: image, object, point; SAM: image, point
        inputs = processor(
            images=Image.fromarray(rgb),
            input_points=nest(points.tolist()),
            input_labels=nest(labels.tolist()),
            return_tensors="pt",
        ).to(model.device)
        key = hashlib.sha1(np.ascontiguousarray(rgb).data).hexdigest() + repr(rgb.shape)
        if encoded.get("key") != key:
            encoded.update(key=key, embeddings=model.get_image_embeddings(inputs["pixel_values"]))
        out = model(
            image_embeddings=encoded["embeddings"],
            input_points=inputs["input_points"],
            input_labels=inputs["input_labels"],
            multimask_output=True,
        )
        padded = [inputs["reshaped_input_sizes"].cpu()] if "reshaped_input_sizes" in inputs else []  # SAM
        masks = processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"].cpu(), *padded
        )[0][0]  # (candidates, H, W)
        return masks[int(out.iou_scores[0, 0].argmax())].numpy().astype(bool)

    return run


def _is_video_pair(segmenter: Any) -> bool:
    from transformers import Sam2VideoModel, Sam2VideoProcessor

    return any(isinstance(part, Sam2VideoModel | Sam2VideoProcessor) for part in segmenter)


def image_segmenter(segmenter: Any) -> Segmenter | None:
    """The :data:`Segmenter` of ``segment``'s ``segmenter`` argument (``None`` or ``"threshold"``:
    the threshold refiner, which takes no points; ``"region"``: :func:`region_segmenter`).

    Raises:
        SegmenterMismatchError: neither a callable nor a matching ``(model, processor)`` pair
            (a SAM2 *video* pair belongs to :func:`~attnlens.refam.segment_video`).
    """
    if segmenter is None or segmenter == "threshold":
        return None
    if segmenter == "region":
        return region_segmenter()
    if isinstance(segmenter, str):
        raise SegmenterMismatchError(f"unknown refiner {segmenter!r}: use one of {', '.join(REFINERS)}")
    if isinstance(segmenter, tuple | list) and len(segmenter) == 2:
        if _is_video_pair(segmenter):
            raise SegmenterMismatchError(
                f"{type(segmenter[0]).__name__} segments videos: give it to refam.segment_video, or give "
                f"segment an image segmenter, {_PAIRS}"
            )
        return _sam(*segmenter)
    if callable(segmenter) and not isinstance(segmenter, torch.nn.Module):
        return segmenter
    raise SegmenterMismatchError(
        f"a segmenter is a {_PAIRS} pair or a callable (image (H, W, 3) uint8, points "
        f"(n, 2) xy, labels (n,)) -> (H, W) bool mask; got {type(segmenter).__name__}"
        + (" (give its processor too: segmenter=(model, processor))" if callable(segmenter) else "")
    )


# -- the video segmenter -----------------------------------------------------------------------------


def _sam2_video(model: Any, processor: Any) -> VideoSegmenter:
    """SAM2 prompted on one frame, propagated forwards and backwards through the clip."""
    from transformers import Sam2VideoModel, Sam2VideoProcessor

    if not isinstance(model, Sam2VideoModel) or not isinstance(processor, Sam2VideoProcessor):
        raise SegmenterMismatchError(
            f"a video segmenter is a (Sam2VideoModel, Sam2VideoProcessor) pair from transformers; got "
            f"({type(model).__name__}, {type(processor).__name__})"
        )
    size = model.config.prompt_encoder_config.image_size
    for part in (processor.image_processor, processor.video_processor):
        given = getattr(part, "size", None) or {}
        if given and (given.get("height"), given.get("width")) != (size, size):
            raise SegmenterMismatchError(
                f"the Sam2VideoProcessor resizes frames to {given.get('height')} × {given.get('width')}, but "
                f"the Sam2VideoModel takes {size} × {size}: use the processor saved with the model"
            )

    @torch.no_grad()
    def run(frames: np.ndarray, frame: int, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        t, h, w = frames.shape[:3]
        session = processor.init_video_session(video=frames, inference_device=model.device, dtype=model.dtype)
        processor.add_inputs_to_inference_session(
            inference_session=session,
            frame_idx=frame,
            obj_ids=1,
            input_points=[[points.tolist()]],  # image, object, point, xy
            input_labels=[[labels.tolist()]],
        )
        masks = np.zeros((t, h, w), dtype=bool)
        for reverse in (False, True):  # from the prompted frame to the end, then back to the start
            for out in model.propagate_in_video_iterator(session, start_frame_idx=frame, reverse=reverse):
                mask = processor.post_process_masks([out.pred_masks.cpu()], original_sizes=[[h, w]])[0]
                masks[out.frame_idx] = mask[0, 0].numpy().astype(bool)  # (objects, 1, H, W): the one object
        return masks

    return run


def video_segmenter(segmenter: Any) -> tuple[Segmenter | None, VideoSegmenter | None]:
    """``(per-frame segmenter, video segmenter)`` of ``segment_video``'s ``segmenter``; at most one is set.

    A ``(Sam2VideoModel, Sam2VideoProcessor)`` pair is a video segmenter; an image segmenter
    (see :func:`image_segmenter`) segments each frame on its own; ``None``: the threshold refiner.
    """
    if isinstance(segmenter, tuple | list) and len(segmenter) == 2 and _is_video_pair(segmenter):
        return None, _sam2_video(*segmenter)
    try:
        return image_segmenter(segmenter), None
    except SegmenterMismatchError as err:
        raise SegmenterMismatchError(
            f"{err}; for a video, also a (Sam2VideoModel, Sam2VideoProcessor) pair (propagated in the clip)"
        ) from None
