"""RefCOCO, RefCOCO+ and RefCOCOg in the layout of the ``refer`` toolkit (Yu et al., 2016).

The folder a user gives holds::

    refcoco/refs(unc).p        refcoco/instances.json
    refcoco+/refs(unc).p       refcoco+/instances.json
    refcocog/refs(umd).p       refcocog/instances.json     (or refs(google).p)
    images/mscoco/images/train2014/COCO_train2014_000000581857.jpg …

``refs(…).p`` is a pickled list of referred objects (``ref_id``, ``ann_id``, ``image_id``,
``split``, ``sentences``); it is read with an unpickler that builds plain containers and scalars
only and refuses any pickled object. ``instances.json`` holds the COCO images, annotations and
categories; masks are COCO polygons (or RLE) decoded with pycocotools, as the toolkit does.
Every sentence of every referred object of the split is one sample, in the file's order.

Splits as in the papers: RefCOCO and RefCOCO+ (UNC) ``val``, ``testA``, ``testB``, ``train``;
RefCOCOg ``val``, ``test`` (UMD) or ``val`` (Google), ``train``.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from .base import ImageSample, ReferringDataset, check_split, image_size, need, read_image

__all__ = ["DATASETS", "RefCOCO"]

#: dataset → its partitions (``splitBy``) → their splits; the first partition is the default
DATASETS: dict[str, dict[str, tuple[str, ...]]] = {
    "refcoco": {"unc": ("val", "testA", "testB", "train"), "google": ("val", "test", "train")},
    "refcoco+": {"unc": ("val", "testA", "testB", "train")},
    "refcocog": {"umd": ("val", "test", "train"), "google": ("val", "train")},
}
IMAGES = Path("images", "mscoco", "images", "train2014")


class _PlainUnpickler(pickle.Unpickler):
    """Builds lists, dicts, tuples, strings and numbers; any pickled class or function is refused."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="utf-8")  # refs files were pickled by Python 2
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        raise DatasetError(
            f"{self.path} holds a pickled object ({module}.{name}); attnlens reads refs files made of plain "
            "lists, dicts, strings and numbers only, and never runs what a pickle names"
        )


def read_refs(path: Path) -> list[dict[str, Any]]:
    """The referred objects of a ``refs(…).p`` file, each checked for the fields the toolkit writes."""
    data = need(path, "the refer toolkit's pickled referring expressions").read_bytes()
    try:
        refs = _PlainUnpickler(io.BytesIO(data), path).load()
    except DatasetError:
        raise
    except Exception as err:  # a truncated or foreign file: pickle raises many kinds
        raise DatasetError(f"{path} is not a readable refs pickle: {type(err).__name__}: {err}") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DatasetError(f"{path} does not hold a list of referred objects (dicts)")
    for r in refs:
        missing = {"ref_id", "ann_id", "image_id", "split", "sentences"} - set(r)
        if missing or not all(isinstance(s, dict) and "sent" in s for s in r["sentences"]):
            raise DatasetError(
                f"{path}: ref {r.get('ref_id', '?')} lacks {sorted(missing) or 'sentences with a sent'}"
            )
    return refs


class RefCOCO(ReferringDataset):
    """One split of RefCOCO, RefCOCO+ or RefCOCOg, read from the refer toolkit's layout.

    Args:
        root: the folder holding ``refcoco/``, ``refcoco+/``, ``refcocog/`` and ``images/``.
        dataset: ``"refcoco"``, ``"refcoco+"`` or ``"refcocog"``.
        split: ``"val"``, ``"testA"``, ``"testB"`` (RefCOCO, RefCOCO+), ``"test"`` (RefCOCOg UMD),
            ``"train"``.
        split_by: the partition: ``"unc"`` (RefCOCO, RefCOCO+), ``"umd"`` (RefCOCOg), ``"google"``;
            ``None``: the one the papers report.

    Raises:
        DatasetError: a missing or unreadable file (named), an image of another size than its
            annotation says, an expression whose object or image is not annotated, an unknown
            split; nothing is returned half-read.
    """

    kind = "image"

    def __init__(
        self, root: str | Path, dataset: str = "refcoco", split: str = "val", split_by: str | None = None
    ):
        check_split(dataset, list(DATASETS), "the refer toolkit")
        parts = DATASETS[dataset]
        split_by = split_by or next(iter(parts))
        check_split(split_by, list(parts), f"{dataset}'s partitions")
        check_split(split, parts[split_by], f"{dataset} ({split_by})")
        root = Path(root)
        self.name, self.split, self.split_by = dataset, split, split_by
        folder = root / dataset
        refs = read_refs(folder / f"refs({split_by}).p")
        instances = _read_instances(folder / "instances.json")
        images = {im["id"]: im for im in instances["images"]}
        annotations = {a["id"]: a for a in instances["annotations"]}
        self.images = root / IMAGES
        self._entries = []
        checked: set[Any] = set()
        for r in refs:
            if r["split"] != split:
                continue
            ann, image = annotations.get(r["ann_id"]), images.get(r["image_id"])
            if ann is None or image is None:
                missing = f"annotation {r['ann_id']}" if ann is None else f"image {r['image_id']}"
                raise DatasetError(
                    f"{folder / 'instances.json'} has no {missing}, which ref {r['ref_id']} refers to"
                )
            if image["id"] not in checked:
                path = self.images / image["file_name"]
                if image_size(path) != (image["height"], image["width"]):
                    raise DatasetError(
                        f"{path} is {'×'.join(map(str, image_size(path)))} pixels (H×W), but instances.json "
                        f"gives {image['height']}×{image['width']}: the image and its masks disagree"
                    )
                checked.add(image["id"])
            for sentence in r["sentences"]:
                self._entries.append((r, sentence, ann, image))
        if not self._entries:
            raise DatasetError(f"{folder / f'refs({split_by}).p'} holds no expression of split {split!r}")

    def _id(self, entry: Any) -> str:
        r, sentence, _, _ = entry
        return f"{self.name}/{self.split}/{sentence.get('sent_id', r['ref_id'])}"

    def _load(self, entry: Any) -> ImageSample:
        r, sentence, ann, image = entry
        meta = {
            "ref_id": r["ref_id"],
            "ann_id": r["ann_id"],
            "image_id": r["image_id"],
            "sent_id": sentence.get("sent_id"),
            "category_id": r.get("category_id"),
        }
        return ImageSample(
            id=self._id(entry),
            image=read_image(self.images / image["file_name"]),
            expression=str(sentence["sent"]),
            mask=coco_mask(ann["segmentation"], image["height"], image["width"]),
            meta=meta,
        )


def _read_instances(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(need(path, "the COCO images, annotations and categories").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise DatasetError(f"{path} is not a COCO instances file (no images and annotations)")
    return data


def coco_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) → ``(height, width)`` bool.

    >>> coco_mask([[0, 0, 4, 0, 4, 2, 0, 2]], 4, 6).sum(axis=1).tolist()  # a 4 × 2 rectangle, (H, W)
    [4, 4, 0, 0]
    """
    try:
        from pycocotools import mask as mask_api
    except ImportError:  # pragma: no cover - pycocotools is in the eval and dev extras
        raise ImportError("reading COCO masks needs pycocotools: pip install 'attnlens[eval]'") from None
    if isinstance(segmentation, list):  # polygons of one object: merged into one mask
        rle = mask_api.merge(mask_api.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_api.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_api.decode(rle).astype(bool)
