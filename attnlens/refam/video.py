"""RefAM for videos: a referring expression's attention in a video DiT, turned into a mask per frame.

:func:`segment_video` runs the steps of :func:`~attnlens.refam.segment` (DESIGN.md §7, every knob
a field of :class:`~attnlens.refam.RefamOptions`) on a clip ``(T, H, W[, C])``:

1. **parse** and **prompt** as for images;
2. **encode** the clip at the working resolution with the pipeline's VAE, whose temporal
   compression ``r`` makes latent frame ``f ≥ 1`` cover input frames ``r(f − 1) + 1 … r·f`` (the
   first frame is encoded alone; the clip is padded with its last frame to ``1 + r·k`` frames);
   noise it to flow time ``t`` (``x_t = (1 − t)·x + t·ε``; CogVideoX, a DDPM v-prediction model:
   its scheduler's ``add_noise`` at the timestep nearest ``t · num_train_timesteps``) and run one
   forward per ``forwards``. Wan (``WanPipeline``), CogVideoX (``CogVideoXPipeline``) and Mochi
   (``MochiPipeline``) each keep their quirks in a small backend class; an image model (the
   embedded :class:`~attnlens.zoo.ShapesPipeline`, FLUX) encodes and runs each frame on its own;
3. **capture** ``cross``, whose video queries carry a ``frame`` coordinate, handle the GAS, filter
   the magnets and **aggregate** per token frame (the heatmap normalised over the whole clip);
4. map each input frame to its token frame → a **heatmap per input frame**, its **points**, and a
   mask: the threshold refiner or an image segmenter (SAM, SAM2) frame by frame, or SAM2's video
   model (``Sam2VideoModel``) prompted with the points of the frame with the strongest peak and
   propagated forwards and backwards through the clip.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xarray as xr
from PIL import Image

from .errors import EmptyVideoError, RefamError, SegmenterMismatchError
from .image import (
    RefamOptions,
    _aggregate,
    _as_rgb,
    _attention,
    _Backend,
    _heat,
    _info,
    _loaded,
    _options,
    _PipelineBackend,
    _prompt,
    _prompt_points,
    _resized,
)
from .image import _backend as _image_backend
from .parse import ParsedExpression, parse
from .prompts import RefamPrompt
from .refine import refine, threshold_refine, video_segmenter

__all__ = ["RefamVideoResult", "segment_video"]


@dataclass
class RefamVideoResult:
    """What :func:`segment_video` found, and what lies behind it.

    Attributes:
        masks: ``(T, H, W)`` bool, one mask per input frame at the input size.
        heatmaps: ``(T, H, W)`` float32 in ``[0, 1]`` (normalised over the clip, the prior applied).
        points: per input frame, ``(n, 2)`` float ``(x, y)`` pixel coordinates.
        point_labels: per input frame, ``(n,)`` int, 1 for a positive point, 0 for a negative one.
        maps: the intermediate maps on the token grid: ``target`` ``(layer, frame, y, x)``,
            ``magnet``, ``aggregate`` and ``heatmap`` ``(frame, y, x)``, ``prior`` ``(y, x)``, and
            ``token_frame`` ``(input_frame,)``: the token frame each input frame maps to.
        prompt: the :class:`~attnlens.refam.RefamPrompt` used.
        expression: the :class:`~attnlens.refam.ParsedExpression`.
        options: the :class:`~attnlens.refam.RefamOptions` as a dict.
        info: what actually ran: ``gas_applied``, ``sinks``, ``sink_layers``, ``spared_sinks``
            (for an image model run frame by frame: over all frames, and each frame's in
            ``per_frame``), ``resolution``, ``grid`` (token frames, y, x),
            ``temporal_compression`` (input frames per latent frame), ``refiner`` (per input
            frame) and, with a video segmenter, ``prompt_frame`` (the input frame whose points
            prompted it).
    """

    masks: np.ndarray
    heatmaps: np.ndarray
    points: list[np.ndarray]
    point_labels: list[np.ndarray]
    maps: xr.Dataset
    prompt: RefamPrompt
    expression: ParsedExpression
    options: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


# -- input clips -------------------------------------------------------------------------------------


def _as_clip(frames: Any) -> np.ndarray:
    """A sequence of images, or an array ``(T, H, W)`` / ``(T, H, W, 1|3|4)`` → ``(T, H, W, 3)`` uint8."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if isinstance(frames, Image.Image | str):
        raise RefamError(f"a video is a sequence of frames; got a {type(frames).__name__}: use refam.segment")
    if isinstance(frames, np.ndarray):
        if frames.ndim not in (3, 4):
            raise RefamError(f"a video array is (T, H, W) or (T, H, W, C); got shape {frames.shape}")
        if frames.ndim == 3 and frames.shape[-1] in (3, 4) and len(frames):
            raise RefamError(
                f"a 3-D array is read as (T, H, W) grey frames, and one of shape {frames.shape} looks like "
                "an image: give one image as frames[None] (a 1-frame video) or use refam.segment"
            )
    items = list(frames)
    if not items:
        raise EmptyVideoError("the video has no frames: give at least one")
    rgb = [_as_rgb(f) for f in items]
    sizes = sorted({f.shape[:2] for f in rgb})
    if len(sizes) > 1:
        raise RefamError(f"the frames of a video share one size; got {sizes}")
    return np.stack(rgb)


# -- models ------------------------------------------------------------------------------------------


class _Frames:
    """An image model run frame by frame: each frame encoded, noised and captured on its own."""

    temporal = 1

    def __init__(self, image: _Backend) -> None:
        self.image = image
        self.tokenizer, self.max_length, self.side = image.tokenizer, image.max_length, image.side

    def attention(
        self, clip: np.ndarray, prompt: RefamPrompt, opts: RefamOptions, info: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
        """``(cross (layer, query, key_text), grid (query, 3), layer names, token frame (T,))``."""
        crosses, grids, per_frame = [], [], []
        for i, frame in enumerate(clip):
            frame_info: dict[str, Any] = {"sinks": [], "sink_layers": [], "spared_sinks": []}
            cross, grid, names = _attention(self.image, frame, prompt, opts, frame_info)
            grid = grid.copy()
            grid[:, 0] = i
            crosses.append(cross)
            grids.append(grid)
            per_frame.append(frame_info)
        applied = {f["gas_applied"] for f in per_frame}
        info["gas_applied"] = applied.pop() if len(applied) == 1 else "mixed"
        if opts.sinks == "auto":  # found on each frame: their union
            info["sinks"] = sorted({p for f in per_frame for p in f["sinks"]})
            info["sink_layers"] = sorted({n for f in per_frame for n in f["sink_layers"]})
            info["spared_sinks"] = sorted({p for f in per_frame for p in f["spared_sinks"]})
        else:  # chosen: the same for every frame
            info["sinks"] = per_frame[0]["sinks"]
        info["per_frame"] = per_frame
        return np.concatenate(crosses, axis=1), np.concatenate(grids), names, np.arange(len(clip))


def _clip_attention(
    backend: _PipelineBackend, clip: np.ndarray, prompt: RefamPrompt, opts: RefamOptions, info: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """A video DiT on the whole clip: ``(cross (layer, query, key_text), grid (query, 3), layer names,
    token frame of each input frame (T,))``. The clip is padded with its last frame to the
    ``1 + r·k`` frames a causal VAE of temporal compression ``r`` encodes."""
    r, n = backend.temporal, len(clip)
    padded = 1 + r * math.ceil((n - 1) / r)
    clip = np.concatenate([clip, np.repeat(clip[-1:], padded - n, axis=0)])
    cross, grid, names = _attention(backend, clip, prompt, opts, info)
    latent = -(-np.arange(n) // r)  # ceil(i / r): frame 0 alone, then r frames per latent frame
    return cross, grid, names, latent // backend.patch_t


def _video_backend(model: Any, options: RefamOptions) -> _PipelineBackend | _Frames:
    """The backend of a video pipeline, or an image model's backend run frame by frame."""
    backend = _image_backend(model, options)
    if isinstance(backend, _PipelineBackend) and backend.temporal > 1:
        return backend
    return _Frames(backend)


# -- the pipeline ------------------------------------------------------------------------------------


def segment_video(
    frames: Any,
    expression: str,
    model: Any = "shapes-flux",
    segmenter: Any = None,
    **options: Any,
) -> RefamVideoResult:
    """Segment the object a referring expression names in every frame of a clip.

    >>> from attnlens.testing import tiny_shapes_pipeline
    >>> frames = np.zeros((2, 40, 50, 3), dtype=np.uint8)  # (T, H, W, 3)
    >>> r = segment_video(frames, "the red circle", model=tiny_shapes_pipeline())
    >>> r.masks.shape, r.heatmaps.shape, r.maps["target"].dims
    ((2, 40, 50), (2, 40, 50), ('layer', 'frame', 'y', 'x'))

    Args:
        frames: a sequence of PIL images or arrays (as :func:`~attnlens.refam.segment` takes them,
            all of one size), or an array ``(T, H, W)`` grey / ``(T, H, W, 1|3|4)``; ``T ≥ 1``.
        expression: e.g. ``"the dog running on the left"`` (temporal words are not modelled).
        model: a loaded diffusers ``WanPipeline``, ``CogVideoXPipeline`` or ``MochiPipeline`` (with
            its VAE); an image model of :func:`~attnlens.refam.segment` (a
            :class:`~attnlens.zoo.ShapesPipeline`, a ``FluxPipeline``, a zoo name), run frame by frame.
        segmenter: ``None`` (the ``refiner`` option's, per frame); a ``(Sam2VideoModel,
            Sam2VideoProcessor)`` pair from ``transformers`` (prompted on the frame with the
            strongest peak, propagated through the clip); or an image segmenter of
            :func:`~attnlens.refam.segment`, applied frame by frame.
        **options: fields of :class:`~attnlens.refam.RefamOptions`.

    Returns:
        a :class:`RefamVideoResult`; ``masks`` and ``heatmaps`` are ``(T, H, W)``, the input's size.

    Raises:
        EmptyVideoError: the clip has no frame.
        EmptyExpressionError, NoNounError: the expression names nothing to segment.
        SegmenterMismatchError: the segmenter is not usable, or returned masks of another size.
        UnsupportedModelError: the model is none of the above.
    """
    model = _loaded(model)
    opts = _options(options, model)
    parsed = parse(expression, parser=opts.parser)
    per_frame, propagate = video_segmenter(opts.refiner if segmenter is None else segmenter)
    clip = _as_clip(frames)
    n, height, width = clip.shape[:3]
    backend = _video_backend(model, opts)
    prompt = _prompt(parsed, backend, opts)
    info = _info(backend, parsed)
    work = np.stack([_resized(frame, backend.side) for frame in clip])
    if isinstance(backend, _Frames):
        cross, grid, layer_names, token_frame = backend.attention(work, prompt, opts, info)
    else:
        cross, grid, layer_names, token_frame = _clip_attention(backend, work, prompt, opts, info)
    maps = _aggregate(cross, grid, layer_names, prompt, parsed, opts)
    maps["token_frame"] = ("input_frame", token_frame)
    info.update(grid=tuple(maps["heatmap"].shape), temporal_compression=backend.temporal)

    heatmaps = np.stack([_heat(maps["heatmap"].values[f], (height, width)) for f in token_frame])
    if propagate is not None and opts.prompts == "grid":
        raise SegmenterMismatchError(
            "prompts='grid' prompts an image segmenter frame by frame; a video segmenter takes the peaks"
        )
    points, labels = zip(
        *(
            _prompt_points(maps.isel(frame=int(f)), opts, clip[i], heatmaps[i], per_frame)
            for i, f in enumerate(token_frame)
        ),
        strict=True,
    )
    if propagate is not None and opts.refine:
        prompted = int(np.argmax(maps["heatmap"].values.max(axis=(1, 2))[token_frame]))  # the strongest peak
        masks = np.asarray(propagate(clip, prompted, points[prompted], labels[prompted]))
        if masks.shape != (n, height, width):
            raise SegmenterMismatchError(
                f"the video segmenter returned masks of shape {masks.shape} for a clip of {n, height, width}"
            )
        masks, refiners = masks.astype(bool), ["sam2 video"] * n
        for i in np.flatnonzero(~masks.any(axis=(1, 2))):  # never a silent empty mask: threshold that frame
            peak = tuple(points[i][0]) if len(points[i]) else None
            masks[i], refiners[i] = (
                threshold_refine(heatmaps[i], opts.component, peak),
                "sam2 video (empty) → otsu",
            )
        info["prompt_frame"] = prompted
    else:
        refined = [
            refine(
                clip[i],
                heatmaps[i],
                points[i],
                labels[i],
                per_frame,
                enabled=opts.refine,
                component=opts.component,
            )
            for i in range(n)
        ]
        masks, refiners = np.stack([m for m, _ in refined]), [r for _, r in refined]
    info["refiner"] = refiners
    return RefamVideoResult(
        masks=masks,
        heatmaps=heatmaps,
        points=list(points),
        point_labels=list(labels),
        maps=maps,
        prompt=prompt,
        expression=parsed,
        options=dataclasses.asdict(opts),
        info=info,
    )
