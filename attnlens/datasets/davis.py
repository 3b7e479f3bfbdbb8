"""Ref-DAVIS17 (Khoreva et al., ACCV 2018): DAVIS 2017 videos with referring expressions.

The folder a user gives is DAVIS 2017 (trainval, 480p) with the Ref-DAVIS17 expression files::

    JPEGImages/480p/bike-packing/00000.jpg …
    Annotations/480p/bike-packing/00000.png …   (palette PNGs: index = object id, 0 = background)
    ImageSets/2017/train.txt, val.txt
    davis_text_annotations/Davis17_annot1.txt, Davis17_annot1_full_video.txt,
                           Davis17_annot2.txt, Davis17_annot2_full_video.txt

(``davis_text_annotations/`` may also sit beside the DAVIS folder.) Each expression line reads
``video object_id "expression"``; annotator 1's files are UTF-8 and annotator 2's Latin-1, and the
release misspells three video names (``clasic-car``, ``dog-scale``, ``motor-bike``), read as the
DAVIS names. Two annotators each wrote a first-frame and a full-video expression per object; the
four sets are evaluated together by default, as ReferFormer's evaluation does (``expressions=``
picks one or some). Split ``val`` (30 videos) is the benchmark; ``train`` has 60.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from .base import ReferringDataset, VideoSample, check_split, image_size, need, read_image, read_palette

__all__ = ["EXPRESSION_SETS", "RefDAVIS17"]

#: the expression files of the Ref-DAVIS17 release, and their encodings
EXPRESSION_SETS: dict[str, str] = {
    "annot1": "utf-8",
    "annot1_full_video": "utf-8",
    "annot2": "latin-1",
    "annot2_full_video": "latin-1",
}
_MISSPELLED = {"clasic-car": "classic-car", "dog-scale": "dogs-scale", "motor-bike": "motorbike"}


def read_expressions(path: Path, encoding: str) -> list[tuple[str, int, str]]:
    """``(video, object id, expression)`` of each line of a Ref-DAVIS17 expression file."""
    rows = []
    text = need(path, "Ref-DAVIS17 referring expressions").read_text(encoding=encoding)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=2)
        if (
            len(parts) < 3
            or not parts[1].isdigit()
            or not (parts[2].startswith('"') and parts[2].endswith('"'))
        ):
            raise DatasetError(
                f'{path}:{number}: expected `video object_id "expression"`, got {line.strip()!r}'
            )
        rows.append((_MISSPELLED.get(parts[0], parts[0]), int(parts[1]), parts[2][1:-1].strip()))
    return rows


class RefDAVIS17(ReferringDataset):
    """One split of Ref-DAVIS17.

    Args:
        root: the DAVIS 2017 folder (``JPEGImages``, ``Annotations``, ``ImageSets``).
        split: ``"val"`` (the benchmark) or ``"train"``.
        expressions: which expression sets of :data:`EXPRESSION_SETS` (default: all four).

    Raises:
        DatasetError: a missing frame, annotation or expression file (named), an annotation of
            another size than its frame, an expression of a video outside DAVIS; nothing is
            returned half-read.
    """

    kind = "video"
    name = "ref-davis17"

    def __init__(self, root: str | Path, split: str = "val", expressions: Sequence[str] | None = None):
        check_split(split, ("val", "train"), "Ref-DAVIS17")
        chosen = list(EXPRESSION_SETS) if expressions is None else list(expressions)
        for name in chosen:
            check_split(name, list(EXPRESSION_SETS), "Ref-DAVIS17's expression sets")
        self.root, self.split = Path(root), split
        videos = (
            need(self.root / "ImageSets" / "2017" / f"{split}.txt", "DAVIS 2017's split").read_text().split()
        )
        text = self.root / "davis_text_annotations"
        if not text.exists() and (self.root.parent / "davis_text_annotations").exists():
            text = self.root.parent / "davis_text_annotations"
        self._frames = {v: self._check_video(v) for v in videos}
        self._entries = []
        for name in chosen:
            for video, obj, expression in read_expressions(
                text / f"Davis17_{name}.txt", EXPRESSION_SETS[name]
            ):
                if video in self._frames:
                    self._entries.append((video, obj, expression, name))
        if not self._entries:
            raise DatasetError(f"{text} holds no expression of a video of split {split!r}")

    def _check_video(self, video: str) -> list[str]:
        frames_dir = need(self.root / "JPEGImages" / "480p" / video, f"the frames of {video}")
        names = sorted(p.stem for p in frames_dir.glob("*.jpg"))
        if not names:
            raise DatasetError(f"{frames_dir} holds no .jpg frame")
        for i in (0, len(names) - 1):  # frames of one video share a size: its ends stand for it
            frame = image_size(frames_dir / f"{names[i]}.jpg")
            png = self.root / "Annotations" / "480p" / video / f"{names[i]}.png"
            if image_size(png) != frame:
                raise DatasetError(f"{png} is {image_size(png)} (H, W) but its frame is {frame}")
        for name in names:
            need(
                self.root / "Annotations" / "480p" / video / f"{name}.png", f"the annotation of frame {name}"
            )
        return names

    def _id(self, entry: Any) -> str:
        video, obj, _, name = entry
        return f"{self.name}/{self.split}/{video}/{obj}/{name}"

    def _load(self, entry: Any) -> VideoSample:
        video, obj, expression, name = entry
        names = self._frames[video]
        frames = np.stack([read_image(self.root / "JPEGImages" / "480p" / video / f"{n}.jpg") for n in names])
        masks = read_masks(
            [self.root / "Annotations" / "480p" / video / f"{n}.png" for n in names], obj, frames
        )
        meta = {"video": video, "object_id": obj, "expression_set": name}
        return VideoSample(self._id(entry), frames, expression, masks, tuple(names), meta)


def read_masks(paths: Sequence[Path], obj: int, frames: np.ndarray) -> np.ndarray:
    """``(T, H, W)`` bool masks of object ``obj`` from palette PNGs, each checked against its frame."""
    masks = []
    for path, frame in zip(paths, frames, strict=True):
        ids = read_palette(path)
        if ids.shape != frame.shape[:2]:
            raise DatasetError(f"{path} is {ids.shape} (H, W) but its frame is {frame.shape[:2]}")
        masks.append(ids == obj)
    return np.stack(masks)
