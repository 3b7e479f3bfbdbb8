"""Referring-segmentation benchmarks, read from the folders users keep them in (nothing is downloaded).

- :func:`load`: a split by name, as :class:`~attnlens.datasets.base.ReferringDataset` of typed
  :class:`~attnlens.datasets.base.ImageSample` / :class:`~attnlens.datasets.base.VideoSample`;
- :mod:`~attnlens.datasets.refcoco`: RefCOCO, RefCOCO+, RefCOCOg (the ``refer`` toolkit's layout);
- :mod:`~attnlens.datasets.davis`: Ref-DAVIS17; :mod:`~attnlens.datasets.ytvos`: Ref-YouTube-VOS;
- :mod:`attnlens.datasets.shapesref`: ShapesRef, the synthetic world of coloured shapes (images,
  videos, exact masks, captions, referring expressions, word-level tokenizer) that the embedded
  models are trained on and measured against; :mod:`~attnlens.datasets.synthetic` serves its
  splits as a benchmark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DatasetError
from .base import ImageSample, ReferringDataset, VideoSample

__all__ = ["DATASETS", "ImageSample", "ReferringDataset", "VideoSample", "load"]

#: names :func:`load` takes, and what each is
DATASETS: dict[str, str] = {
    "refcoco": "RefCOCO (UNC): val, testA, testB, train",
    "refcoco+": "RefCOCO+ (UNC): val, testA, testB, train",
    "refcocog": "RefCOCOg (UMD): val, test, train",
    "ref-davis17": "Ref-DAVIS17: val, train",
    "ref-youtube-vos": "Ref-YouTube-VOS: train, valid, test",
    "shapesref": "ShapesRef still scenes: val, test (no root)",
    "shapesref-video": "ShapesRef videos: val, test (no root)",
}


def load(
    name: str, split: str, root: str | Path | None = None, *, limit: int | None = None, **options: Any
) -> ReferringDataset:
    """A benchmark split by name (see :data:`DATASETS`), checked whole before it is returned.

    Args:
        name: a key of :data:`DATASETS`.
        split: the split, named as in the papers.
        root: the dataset's folder (not for ShapesRef).
        limit: keep the first ``limit`` samples.
        **options: the loader's own (``split_by`` for RefCOCO*, ``expressions`` for Ref-DAVIS17).

    >>> load("refcoco", "val")
    Traceback (most recent call last):
    ...
    attnlens.errors.DatasetError: refcoco needs root=, the folder that holds it
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name.startswith("shapesref"):
        from .synthetic import ShapesRefDataset

        return ShapesRefDataset(split, video=name.endswith("video"), limit=limit, **options)
    if root is None:
        raise DatasetError(f"{name} needs root=, the folder that holds it")
    if not Path(root).is_dir():
        raise DatasetError(f"{root} is not a folder (the root of {name})")
    if name.startswith("refcoco"):
        from .refcoco import RefCOCO

        ds: ReferringDataset = RefCOCO(root, name, split, **options)
    elif name == "ref-davis17":
        from .davis import RefDAVIS17

        ds = RefDAVIS17(root, split, **options)
    else:
        from .ytvos import RefYouTubeVOS

        ds = RefYouTubeVOS(root, split, **options)
    return ds.limit(limit)
