"""RefAM: training-free referring segmentation from a diffusion transformer's attention.

After Kukleva et al., "RefAM: Attention Magnets for Zero-Shot Referral Segmentation"
(arXiv 2509.22650); DESIGN.md §7 and REFAM.md give the steps and starting defaults. The
expression is parsed (:func:`parse`), put into a prompt with appended attention magnets
(:func:`build_prompt`), and :func:`segment` reads the target words' attention from one noised
forward, handles global attention sinks, aggregates, and refines the heatmap into a mask;
:func:`segment_video` does the same for every frame of a clip, with a video DiT (Wan, CogVideoX,
Mochi) or an image model frame by frame, and SAM2 can propagate the mask through the clip.

>>> from attnlens import refam
>>> refam.parse("the large blue square at the bottom", parser="rules").head
'square'
"""

from __future__ import annotations

from ..analysis.metrics import otsu_threshold
from .errors import EmptyExpressionError, EmptyVideoError, NoNounError, RefamError, SegmenterMismatchError
from .image import GAS_CHOICES, RefamOptions, RefamResult, segment, spatial_prior
from .parse import SPATIAL_WORDS, ParsedExpression, parse
from .prompts import DEFAULT_COLOUR, DEFAULT_MAGNETS, RefamPrompt, build_prompt, compose
from .refine import region_segmenter
from .video import RefamVideoResult, segment_video

__all__ = [
    "DEFAULT_COLOUR",
    "DEFAULT_MAGNETS",
    "GAS_CHOICES",
    "SPATIAL_WORDS",
    "EmptyExpressionError",
    "EmptyVideoError",
    "NoNounError",
    "ParsedExpression",
    "RefamError",
    "RefamOptions",
    "RefamPrompt",
    "RefamResult",
    "RefamVideoResult",
    "SegmenterMismatchError",
    "build_prompt",
    "compose",
    "otsu_threshold",
    "parse",
    "region_segmenter",
    "segment",
    "segment_video",
    "spatial_prior",
]
