"""What every referring-segmentation benchmark loader gives: typed samples in a fixed order.

A loader checks its whole split when it is opened (every file there, every image of the size its
annotation says, every expression pointing at an object that exists), so a damaged folder fails
at once with a :class:`~attnlens.errors.DatasetError` naming the file, never half-way through an
evaluation. Pixels are read when a sample is taken (``ds[i]``), so opening RefCOCO's 142k
expressions costs their annotations only.

>>> from attnlens.datasets import load
>>> ds = load("shapesref", "test", limit=2)
>>> len(ds), ds.kind, ds.ids()[0]
(2, 'image', 'shapesref/test/0')
>>> s = ds[0]
>>> s.image.dtype, s.mask.shape == s.image.shape[:2]  # (H, W, 3) uint8, (H, W) bool
(dtype('uint8'), True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DatasetError

__all__ = ["ImageSample", "ReferringDataset", "VideoSample", "read_image", "read_palette"]


@dataclass(frozen=True, eq=False)
class ImageSample:
    """One referring expression on one image.

    Attributes:
        id: unique within the dataset and stable across runs, e.g. ``"refcoco/val/sent/4"``.
        image: ``(H, W, 3)`` uint8 RGB.
        expression: the referring expression as the dataset gives it.
        mask: ``(H, W)`` bool, the referred object.
        meta: the dataset's own ids (``image_id``, ``ann_id``, ``ref_id``, ``sent_id``, …).
    """

    id: str
    image: np.ndarray
    expression: str
    mask: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class VideoSample:
    """One referring expression on one video.

    Attributes:
        id: unique within the dataset, e.g. ``"ref-davis17/val/bike-packing/1/annot1_full_video"``.
        frames: ``(T, H, W, 3)`` uint8 RGB.
        expression: the referring expression.
        masks: ``(T, H, W)`` bool per frame, or ``None`` where the split's masks are not public
            (Ref-YouTube-VOS ``valid`` and ``test``).
        frame_names: the frame files' stems, ``(T,)``.
        meta: the dataset's ids (``video``, ``object_id``, ``annotator``, …).
    """

    id: str
    frames: np.ndarray
    expression: str
    masks: np.ndarray | None
    frame_names: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)


class ReferringDataset(Sequence):
    """A split of a referring-segmentation benchmark: ``len(ds)`` samples, ``ds[i]`` reads one.

    Subclasses fill ``name``, ``split``, ``kind`` (``"image"`` or ``"video"``) and ``_entries`` (one
    light record per sample, in the dataset's order) and implement :meth:`_load`.
    """

    name: str
    split: str
    kind: str
    _entries: list[Any]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> ImageSample | VideoSample:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("take samples one at a time: ds[i]; ds.ids() lists them all")
        return self._load(self._entries[i])

    def __iter__(self) -> Iterator[ImageSample | VideoSample]:
        return (self._load(e) for e in self._entries)

    def ids(self) -> list[str]:
        """The id of every sample, in order, without reading pixels."""
        return [self._id(e) for e in self._entries]

    def limit(self, n: int | None) -> ReferringDataset:
        """This split cut to its first ``n`` samples (``None``: all of them)."""
        if n is not None:
            if n < 0:
                raise ValueError(f"a limit is 0 or more samples; got {n}")
            self._entries = self._entries[:n]
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}/{self.split}: {len(self)} {self.kind} samples>"

    def _id(self, entry: Any) -> str:
        raise NotImplementedError

    def _load(self, entry: Any) -> ImageSample | VideoSample:
        raise NotImplementedError


def need(path: Path, what: str) -> Path:
    """``path`` if it exists, else a :class:`DatasetError` saying what it should hold."""
    if not path.exists():
        raise DatasetError(f"{path} is missing ({what})")
    return path


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from an image file's header (no pixels are decoded)."""
    try:
        with Image.open(need(path, "an image")) as im:
            return im.height, im.width
    except (OSError, SyntaxError) as err:
        raise DatasetError(f"{path} is not a readable image: {err}") from None


def read_image(path: Path) -> np.ndarray:
    """An image file → ``(H, W, 3)`` uint8 RGB."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError) as err:
        raise DatasetError(f"{path} is not a readable image: {err}") from None


def read_palette(path: Path) -> np.ndarray:
    """A DAVIS / YouTube-VOS annotation (a palette PNG whose indices are object ids) → ``(H, W)`` uint8."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DatasetError(
                    f"{path} is a {im.mode} image; object annotations are palette PNGs whose indices are "
                    "object ids"
                )
            return np.asarray(im)
    except (OSError, SyntaxError) as err:
        raise DatasetError(f"{path} is not a readable annotation: {err}") from None


def check_split(split: str, splits: Sequence[str], source: str) -> None:
    if split not in splits:
        raise DatasetError(f"unknown split {split!r} of {source}; its splits: {', '.join(splits)}")
