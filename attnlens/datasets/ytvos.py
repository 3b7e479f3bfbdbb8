"""Ref-YouTube-VOS (Seo et al., ECCV 2020): YouTube-VOS videos with referring expressions.

The folder a user gives holds::

    meta_expressions/{train,valid,test}/meta_expressions.json
    {train,valid,test}/JPEGImages/<video>/<frame>.jpg
    train/Annotations/<video>/<frame>.png       (palette PNGs: index = object id)

``meta_expressions.json`` reads ``{"videos": {video: {"expressions": {exp_id: {"exp": text,
"obj_id": id}}, "frames": [frame stems]}}}``. Masks are public for ``train`` only (``valid`` is
scored by the challenge server), so samples of the other splits have ``masks=None``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from .base import ReferringDataset, VideoSample, check_split, image_size, need, read_image
from .davis import read_masks

__all__ = ["RefYouTubeVOS"]


class RefYouTubeVOS(ReferringDataset):
    """One split of Ref-YouTube-VOS.

    Args:
        root: the folder holding ``meta_expressions/`` and the split folders.
        split: ``"train"``, ``"valid"`` or ``"test"``.

    Raises:
        DatasetError: a missing frame, annotation or metadata file (named), an annotation of
            another size than its frame, malformed metadata; nothing is returned half-read.
    """

    kind = "video"
    name = "ref-youtube-vos"

    def __init__(self, root: str | Path, split: str = "valid"):
        check_split(split, ("train", "valid", "test"), "Ref-YouTube-VOS")
        self.root, self.split = Path(root), split
        path = need(self.root / "meta_expressions" / split / "meta_expressions.json", "the expressions")
        try:
            videos = json.loads(path.read_text())["videos"]
            entries = [
                (video, str(exp_id), str(e["exp"]), int(e["obj_id"]), list(v["frames"]))
                for video, v in videos.items()
                for exp_id, e in v["expressions"].items()
            ]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{path} is not a Ref-YouTube-VOS meta_expressions file: {err!r}") from None
        annotations = self.root / split / "Annotations"
        self.has_masks = annotations.exists()
        for video, _, _, _, frames in entries:
            if not frames:
                raise DatasetError(f"{path}: video {video} lists no frame")
            for name in frames:
                frame = self.root / split / "JPEGImages" / video / f"{name}.jpg"
                need(frame, f"frame {name} of {video}")
                if self.has_masks and image_size(annotations / video / f"{name}.png") != image_size(frame):
                    raise DatasetError(f"{annotations / video / f'{name}.png'} is not the size of its frame")
        self._entries = entries

    def _id(self, entry: Any) -> str:
        return f"{self.name}/{self.split}/{entry[0]}/{entry[1]}"

    def _load(self, entry: Any) -> VideoSample:
        video, exp_id, expression, obj, names = entry
        folder = self.root / self.split
        frames = np.stack([read_image(folder / "JPEGImages" / video / f"{n}.jpg") for n in names])
        masks = None
        if self.has_masks:
            masks = read_masks([folder / "Annotations" / video / f"{n}.png" for n in names], obj, frames)
        meta = {"video": video, "expression_id": exp_id, "object_id": obj}
        return VideoSample(self._id(entry), frames, expression, masks, tuple(names), meta)
