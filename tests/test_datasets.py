"""Benchmark loaders on folders written in each real format, good and damaged.

Each damaged folder must fail when it is opened, with a :class:`DatasetError` naming the file, so
that no evaluation starts on half a split. The real photographs of Debian's ``labelme-examples``
(PASCAL VOC images with COCO polygons, a street video) are read end to end where apt can fetch them.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from attnlens.datasets import ImageSample, VideoSample, load
from attnlens.datasets.refcoco import coco_mask
from attnlens.errors import DatasetError
from attnlens.testing import (
    LABELME_EXPRESSIONS,
    labelme_benchmarks,
    labelme_examples,
    write_davis_folder,
    write_refer_folder,
)

pytest.importorskip("pycocotools", reason="RefCOCO masks are COCO polygons (the eval extra)")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

SQUARE = [[2.0, 2.0, 10.0, 2.0, 10.0, 8.0, 2.0, 8.0]]  # x, y polygon: columns 2–9, rows 2–7


def photo(h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture
def refer(tmp_path):
    """RefCOCO's layout: two photos, three referred objects in val, testA and testB."""
    refs = [
        {
            "file_name": "a.jpg",
            "segmentation": SQUARE,
            "sentences": ["the square", "left box"],
            "split": "val",
        },
        {"file_name": "b.jpg", "segmentation": SQUARE, "sentences": ["the other one"], "split": "testA"},
        {
            "file_name": "a.jpg",
            "segmentation": [[0, 0, 4, 0, 4, 4]],
            "sentences": ["a corner"],
            "split": "testB",
        },
    ]
    return write_refer_folder(tmp_path, {"a.jpg": photo(), "b.jpg": photo(seed=1)}, refs)


def video(frames: int = 3, h: int = 10, w: int = 14) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((frames, h, w), np.uint8)
    for t in range(frames):
        ids[t, 2:6, t : t + 4] = 1  # object 1 moves right
        ids[t, 7:9, 8:12] = 2
    return np.stack([photo(h, w, seed=t) for t in range(frames)]), ids


@pytest.fixture
def davis(tmp_path):
    return write_davis_folder(
        tmp_path, {"cars": video()}, [("cars", 1, "the moving car"), ("cars", 2, "the parked car")]
    )


# -- RefCOCO, RefCOCO+, RefCOCOg -------------------------------------------------------------------------


def test_refcoco_reads_every_sentence_of_a_split_with_its_coco_mask(refer):
    ds = load("refcoco", "val", refer)
    assert len(ds) == 2 and ds.kind == "image"
    assert ds.ids() == ["refcoco/val/0", "refcoco/val/1"]
    sample = ds[1]
    assert isinstance(sample, ImageSample) and sample.expression == "left box"
    assert sample.image.shape == (12, 16, 3) and sample.image.dtype == np.uint8
    expected = np.zeros((12, 16), bool)
    expected[2:8, 2:10] = True  # pycocotools rasterises the polygon's inside
    assert (sample.mask == expected).mean() > 0.95 and sample.mask[4, 5]
    assert sample.meta["ann_id"] == 100 and sample.meta["sent_id"] == 1
    assert [s.expression for s in load("refcoco", "testB", refer)] == ["a corner"]
    assert len(load("refcoco", "val", refer, limit=1)) == 1


def test_refcocog_uses_the_umd_partition_and_its_splits(tmp_path):
    refs = [{"file_name": "a.jpg", "segmentation": SQUARE, "sentences": ["a box"], "split": "test"}]
    root = write_refer_folder(tmp_path, {"a.jpg": photo()}, refs, dataset="refcocog", split_by="umd")
    assert load("refcocog", "test", root)[0].expression == "a box"
    with pytest.raises(DatasetError, match="unknown split 'testA' of refcocog"):
        load("refcocog", "testA", root)


def test_rle_masks_decode_like_polygons():
    from pycocotools import mask as mask_api

    square = coco_mask(SQUARE, 12, 16)
    rle = mask_api.encode(np.asfortranarray(square.astype(np.uint8)))
    assert (coco_mask(rle, 12, 16) == square).all()
    assert coco_mask({"counts": [26, 6, 160], "size": [12, 16]}, 12, 16).sum() == 6  # uncompressed RLE


def test_unknown_splits_and_datasets_are_named(refer):
    with pytest.raises(
        DatasetError, match=r"unknown split 'test' of refcoco \(unc\); its splits: val, testA"
    ):
        load("refcoco", "test", refer)
    with pytest.raises(DatasetError, match="unknown dataset 'coco'"):
        load("coco", "val", refer)
    with pytest.raises(DatasetError, match="needs root="):
        load("refcoco+", "val")


def test_a_missing_image_is_named_before_anything_loads(refer):
    (refer / "images" / "mscoco" / "images" / "train2014" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match=r"a\.jpg is missing"):
        load("refcoco", "val", refer)


def test_an_image_of_another_size_than_its_masks_is_refused(refer):
    Image.fromarray(photo(10, 16)).save(refer / "images" / "mscoco" / "images" / "train2014" / "a.jpg")
    with pytest.raises(DatasetError, match=r"a\.jpg is 10×16 pixels .* gives 12×16"):
        load("refcoco", "val", refer)


def test_a_pickle_holding_an_object_is_refused_and_never_run(refer, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (refer / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 0, "x": Payload()}], protocol=2))
    with pytest.raises(DatasetError, match=r"refs\(unc\)\.p holds a pickled object \(io\.open\)"):
        load("refcoco", "val", refer)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a pickle", "is not a readable refs pickle"),
        (pickle.dumps({"refs": []}, protocol=2), "does not hold a list"),
        (pickle.dumps([{"ref_id": 3, "split": "val"}], protocol=2), "ref 3 lacks"),
        (
            pickle.dumps(
                [{"ref_id": 3, "ann_id": 9, "image_id": 0, "split": "val", "sentences": [{"sent": "x"}]}]
            ),
            "has no annotation 9",
        ),
    ],
)
def test_malformed_refs_files_are_named(refer, content, message):
    (refer / "refcoco" / "refs(unc).p").write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        load("refcoco", "val", refer)


def test_a_foreign_instances_file_is_named(refer):
    (refer / "refcoco" / "instances.json").write_text(json.dumps({"info": {}}))
    with pytest.raises(DatasetError, match=r"instances\.json is not a COCO instances file"):
        load("refcoco", "val", refer)
    (refer / "refcoco" / "instances.json").write_text("{")
    with pytest.raises(DatasetError, match="not readable JSON"):
        load("refcoco", "val", refer)


# -- Ref-DAVIS17 -----------------------------------------------------------------------------------------


def test_ref_davis17_reads_each_expression_set_with_per_frame_masks(davis):
    ds = load("ref-davis17", "val", davis)
    assert len(ds) == 8 and ds.kind == "video"  # 2 objects × (2 annotators × first-frame / full-video)
    sample = ds[0]
    assert isinstance(sample, VideoSample) and sample.expression == "the moving car"
    assert sample.frames.shape == (3, 10, 14, 3) and sample.masks.shape == (3, 10, 14)
    assert sample.frame_names == ("00000", "00001", "00002")
    assert sample.masks[2, 2:6, 2:6].all() and sample.masks.sum() == 3 * 16
    assert sample.meta == {"video": "cars", "object_id": 1, "expression_set": "annot1"}
    full = load("ref-davis17", "val", davis, expressions=["annot2_full_video"])
    assert full.ids() == [
        "ref-davis17/val/cars/1/annot2_full_video",
        "ref-davis17/val/cars/2/annot2_full_video",
    ]


def test_ref_davis17_reads_latin1_and_the_misspelled_names_of_the_release(davis):
    text = davis / "davis_text_annotations" / "Davis17_annot2.txt"
    text.write_bytes('cars 1 "the café car"\nmotor-bike 1 "ignored"\n'.encode("latin-1"))
    ds = load("ref-davis17", "val", davis, expressions=["annot2"])
    assert [s.expression for s in ds] == ["the café car"]


def test_damaged_davis_folders_are_named(davis):
    with pytest.raises(DatasetError, match="unknown split 'test' of Ref-DAVIS17"):
        load("ref-davis17", "test", davis)
    with pytest.raises(DatasetError, match="unknown split 'annot3' of Ref-DAVIS17's expression sets"):
        load("ref-davis17", "val", davis, expressions=["annot3"])
    png = davis / "Annotations" / "480p" / "cars" / "00002.png"
    Image.fromarray(np.zeros((9, 14), np.uint8), mode="P").save(png)
    with pytest.raises(DatasetError, match=r"00002\.png is \(9, 14\) .* but its frame is \(10, 14\)"):
        load("ref-davis17", "val", davis)
    png.unlink()
    with pytest.raises(DatasetError, match=r"00002\.png is missing"):
        load("ref-davis17", "val", davis)


def test_a_malformed_expression_line_is_named_with_its_number(davis):
    (davis / "davis_text_annotations" / "Davis17_annot1.txt").write_text('cars 1 "ok"\ncars one "bad"\n')
    with pytest.raises(DatasetError, match=r"Davis17_annot1\.txt:2: expected"):
        load("ref-davis17", "val", davis)


# -- Ref-YouTube-VOS -------------------------------------------------------------------------------------


def write_ytvos(root, split: str, masks: bool):
    frames, ids = video()
    (root / split / "JPEGImages" / "v1").mkdir(parents=True)
    if masks:
        (root / split / "Annotations" / "v1").mkdir(parents=True)
    for t in range(len(frames)):
        Image.fromarray(frames[t]).save(root / split / "JPEGImages" / "v1" / f"{t * 5:05d}.jpg")
        if masks:
            Image.fromarray(ids[t], mode="P").save(root / split / "Annotations" / "v1" / f"{t * 5:05d}.png")
    meta = {"videos": {"v1": {"expressions": {"0": {"exp": "a car moving right", "obj_id": "1"}},
                              "frames": [f"{t * 5:05d}" for t in range(len(frames))]}}}  # fmt: skip
    (root / "meta_expressions" / split).mkdir(parents=True)
    (root / "meta_expressions" / split / "meta_expressions.json").write_text(json.dumps(meta))
    return root


def test_ref_youtube_vos_reads_masks_where_the_split_has_them(tmp_path):
    train = load("ref-youtube-vos", "train", write_ytvos(tmp_path, "train", masks=True))
    sample = train[0]
    assert sample.id == "ref-youtube-vos/train/v1/0" and sample.frame_names == ("00000", "00005", "00010")
    assert sample.masks.shape == (3, 10, 14) and sample.masks[1, 2:6, 1:5].all()
    valid = load("ref-youtube-vos", "valid", write_ytvos(tmp_path, "valid", masks=False))
    assert valid[0].masks is None and valid[0].expression == "a car moving right"


def test_damaged_ref_youtube_vos_folders_are_named(tmp_path):
    root = write_ytvos(tmp_path, "train", masks=True)
    (root / "train" / "JPEGImages" / "v1" / "00005.jpg").unlink()
    with pytest.raises(DatasetError, match=r"00005\.jpg is missing"):
        load("ref-youtube-vos", "train", root)
    (root / "meta_expressions" / "train" / "meta_expressions.json").write_text('{"videos": {"v1": {}}}')
    with pytest.raises(DatasetError, match="not a Ref-YouTube-VOS meta_expressions file"):
        load("ref-youtube-vos", "train", root)


# -- ShapesRef -------------------------------------------------------------------------------------------


def test_shapesref_splits_are_typed_samples_of_its_public_api():
    from attnlens.datasets import shapesref

    ds = load("shapesref", "val", limit=3)
    pairs = list(shapesref.expressions("val", 3))
    assert len(ds) == 3 and [s.expression for s in ds] == [e.text for _, e in pairs]
    assert (ds[2].mask == pairs[2][0].masks[pairs[2][1].target]).all()
    clip = load("shapesref-video", "test", limit=1)[0]
    assert clip.frames.ndim == 4 and clip.masks.shape == clip.frames.shape[:3]
    v2 = load("shapesref", "test", limit=2, world="v2")  # the world of the shipped shapes-flux
    assert v2[1].id == "shapesref-v2/test/1" and v2[1].image.shape == (32, 32, 3)
    assert v2[1].expression == list(shapesref.expressions("test", 2, world="v2"))[1][1].text
    with pytest.raises(DatasetError, match="unknown split 'train' of ShapesRef"):
        load("shapesref", "train")


# -- real photographs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelme(tmp_path_factory):
    try:
        examples = labelme_examples()
    except RuntimeError as err:
        pytest.skip(f"Debian's labelme-examples could not be fetched: {err}")
    return labelme_benchmarks(tmp_path_factory.mktemp("labelme"), examples)


def test_labelme_photographs_read_as_refcoco(labelme):
    ds = load("refcoco", "val", labelme["refcoco"])
    assert len(ds) == sum(len(v) for v in LABELME_EXPRESSIONS.values()) == 9
    bus = next(s for s in ds if s.expression == "the big red bus")
    assert bus.image.shape == (375, 500, 3)
    assert 0.4 < bus.mask.mean() < 0.7  # the bus fills the middle of the photograph
    _, xs = np.nonzero(next(s for s in ds if s.expression == "the green bus on the left").mask)
    assert xs.max() < 120  # it stays at the left edge


def test_labelme_street_video_reads_as_ref_davis17(labelme):
    ds = load("ref-davis17", "val", labelme["ref-davis17"], expressions=["annot1_full_video"])
    truck, car = ds[0], ds[1]
    assert truck.frames.shape == (5, 563, 1000, 3) and truck.masks.shape == (5, 563, 1000)
    assert truck.masks.any(axis=(1, 2)).all() and car.masks.any(axis=(1, 2)).all()
    assert not (truck.masks & car.masks).any()
    assert np.nonzero(car.masks[0])[1].min() > 850  # the car enters at the right edge
