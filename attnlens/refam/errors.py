"""Errors of the RefAM pipeline, all :class:`~attnlens.AttnlensError` subclasses."""

from __future__ import annotations

from ..errors import AttnlensError

__all__ = ["EmptyExpressionError", "NoNounError", "RefamError", "SegmenterMismatchError"]


class RefamError(AttnlensError):
    """Base class of what :func:`attnlens.refam.segment` reports on purpose."""


class EmptyExpressionError(RefamError, ValueError):
    """The referring expression is empty, blank, or holds no word at all."""


class NoNounError(RefamError, ValueError):
    """Parsing found no noun to take the attention of (``"on the left"``, ``"the red one"``)."""


class SegmenterMismatchError(RefamError, TypeError):
    """The segmenter is not one :func:`~attnlens.refam.segment` can drive, or its parts disagree."""
