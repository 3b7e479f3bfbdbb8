"""The one error family of attnlens.

Every error attnlens raises on purpose derives from :class:`AttnlensError`, so that
``except attnlens.AttnlensError`` catches exactly what the library reports, and each
message names what was wrong and what would have been valid.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AttnlensError",
    "CaptureTooLargeError",
    "EmptySpecError",
    "HeadIndexError",
    "HookError",
    "LayoutError",
    "UnknownLayerError",
    "UnsupportedModelError",
]


class AttnlensError(Exception):
    """Base class of every error attnlens raises on purpose."""


class UnsupportedModelError(AttnlensError, TypeError):
    """The object handed to attnlens is no model attnlens knows how to hook."""


class UnknownLayerError(AttnlensError, KeyError):
    """A layer selector matched no attention layer of the model."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class HeadIndexError(AttnlensError, IndexError):
    """A head index lies outside ``range(num_heads)``."""


class EmptySpecError(AttnlensError, ValueError):
    """A :class:`~attnlens.CaptureSpec` asks for nothing, or for something unknown."""


class CaptureTooLargeError(AttnlensError, MemoryError):
    """What a capture would keep exceeds its configured memory limit."""


class HookError(AttnlensError, RuntimeError):
    """Hooks cannot be attached: nesting, double attachment or a detached capture."""


class LayoutError(AttnlensError, ValueError):
    """Captured calls disagree on their token layout and cannot share one Dataset."""


def choices(values: Iterable[object], limit: int = 12) -> str:
    """Format valid choices for an error message, eliding the middle of long lists.

    >>> choices(["a", "b", "c"])
    'a, b, c'
    >>> choices(range(30), limit=4)
    '0, 1, ..., 28, 29 (30 in all)'
    """
    items = [str(v) for v in values]
    if len(items) <= limit:
        return ", ".join(items)
    half = limit // 2
    return ", ".join([*items[:half], "...", *items[-half:]]) + f" ({len(items)} in all)"
