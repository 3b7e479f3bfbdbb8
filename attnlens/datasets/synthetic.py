"""ShapesRef as a benchmark split: its ``(scene, expression)`` pairs as typed samples.

Wraps :func:`attnlens.datasets.shapesref.expressions`: sample ``i`` is the ``i``-th pair of the
frozen split, its mask the target object's exact mask, its ``meta`` the expression's kind, head
noun and whether another object shares the target's colour.
"""

from __future__ import annotations

from typing import Any

from . import shapesref
from .base import ImageSample, ReferringDataset, VideoSample, check_split

__all__ = ["ShapesRefDataset"]


class ShapesRefDataset(ReferringDataset):
    """ShapesRef's ``val`` or ``test`` split, of still scenes or (``video=True``) moving ones.

    Args:
        split: ``"val"`` or ``"test"``.
        video: draw the video variant of the split.
        limit: the first ``limit`` expressions only (the scenes behind the rest are never drawn).
        world: a ShapesRef :class:`~attnlens.datasets.shapesref.World` or its name; sample ids
            name it unless it is ``"v1"``.
    """

    name = "shapesref"

    def __init__(
        self,
        split: str = "test",
        *,
        video: bool = False,
        limit: int | None = None,
        world: shapesref.World | str = "v1",
    ):
        check_split(split, [s for s, n in shapesref.SPLITS.items() if n], "ShapesRef")
        self.split, self.kind, self.video = split, "video" if video else "image", video
        world = shapesref.world_of(world)
        self.name = "-".join(["shapesref"] + [world.name] * (world.name != "v1") + ["video"] * video)
        self._entries = list(enumerate(shapesref.expressions(split, limit, video=video, world=world)))

    def _id(self, entry: Any) -> str:
        return f"{self.name}/{self.split}/{entry[0]}"

    def _load(self, entry: Any) -> ImageSample | VideoSample:
        _, (scene, e) = entry
        meta = {
            "kind": e.kind,
            "head_noun": e.head_noun,
            "same_colour_distractor": e.has_same_colour_distractor,
        }
        if self.video:
            names = tuple(f"{t:05d}" for t in range(len(scene.frames)))
            return VideoSample(self._id(entry), scene.frames, e.text, scene.masks[:, e.target], names, meta)
        return ImageSample(self._id(entry), scene.image, e.text, scene.masks[e.target], meta)
