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
    "ClusterError",
    "CorruptStoreError",
    "DatasetError",
    "EmptySpecError",
    "HeadIndexError",
    "HookError",
    "InputError",
    "LayoutError",
    "MissingVariableError",
    "NotAStoreError",
    "SelectionError",
    "StoreError",
    "StoreFullError",
    "StoreNotFoundError",
    "StoreVersionError",
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


class MissingVariableError(AttnlensError, ValueError):
    """A Dataset lacks a variable, coordinate or word that an analysis needs."""


class SelectionError(AttnlensError, KeyError):
    """A selection on a capture Dataset (word, token, layer, head, step, sample) matches nothing."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class DatasetError(AttnlensError, ValueError):
    """A benchmark folder lacks a file, holds one in another format, or has no such split;
    the message names the file."""


class StoreError(AttnlensError):
    """An attention store cannot be read or written."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """Nothing exists where a store was expected."""


class NotAStoreError(StoreError, ValueError):
    """The location is an empty folder, or holds data that another tool wrote."""


class StoreVersionError(StoreError):
    """The store was written with a newer store schema than this attnlens reads."""


class CorruptStoreError(StoreError):
    """Part of a store (metadata or a chunk) is truncated or damaged."""


class StoreFullError(StoreError, OSError):
    """The store's storage ran out of space; the samples completed before stay readable."""

    def __str__(self) -> str:  # OSError would prefix "[Errno 28]" to the message
        return str(self.strerror if self.strerror is not None else self.args[0])


class ClusterError(AttnlensError, ConnectionError):
    """A dask scheduler cannot be reached, or a local cluster cannot start."""


class InputError(AttnlensError, ValueError):
    """A file, folder or value given on the command line is missing, unreadable or of the wrong kind."""


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
