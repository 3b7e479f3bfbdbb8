"""Errors of the RefAM pipeline, all :class:`~attnlens.AttnlensError` subclasses."""

from __future__ import annotations

from ..errors import AttnlensError

__all__ = ["EmptyExpressionError", "EmptyVideoError", "NoNounError", "RefamError", "SegmenterMismatchError"]


class RefamError(AttnlensError):
    """Base class of what :func:`~attnlens.refam.segment` and ``segment_video`` report on purpose."""


class EmptyExpressionError(RefamError, ValueError):
    """The referring expression is empty, blank, or holds no word at all."""


class NoNounError(RefamError, ValueError):
    """Parsing found no noun to take the attention of (``"on the left"``, ``"the red one"``)."""


class SegmenterMismatchError(RefamError, TypeError):
    """The segmenter is not one that RefAM can drive, or its parts disagree."""


class EmptyVideoError(RefamError, ValueError):
    """The video has no frames."""
