"""The SAM 2 processors of ``attnlens.testing.tiny_sam2`` give what transformers' own give.

transformers' ``Sam2ImageProcessor`` and ``Sam2VideoVideoProcessor`` need torchvision, which does not
import beside the CPU torch this project installs, so ``tiny_sam2`` hands out torch-only stand-ins.
``tests/fixtures/sam2_reference.npz`` holds the real processors' outputs on the inputs of
``tests/fixtures/make_sam2_reference.py``, saved once in a throwaway venv with torchvision (that
script's docstring says how to regenerate it). Where torchvision is installed, ``tiny_sam2`` gives the
real processors and these tests check them against the same file.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnlens.testing import _resizes_uint8_natively, tiny_sam2


def _load_reference_script():
    path = Path(__file__).parent / "fixtures" / "make_sam2_reference.py"
    spec = importlib.util.spec_from_file_location("make_sam2_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_reference_script()
saved = np.load(ref.FIXTURE)
inputs = ref.cases()

# torchvision resizes uint8 images natively on AVX2/AVX512 CPUs (the fixture was made on one) and through
# float32 elsewhere: the two round differently, by at most one grey level, 1 / (255 std) once normalised.
# On a CPU that takes the fixture's path the pixels are equal to the bit.
SAME_RESIZE = _resizes_uint8_natively() == _resizes_uint8_natively(str(saved["cpu_capability"]), "x86_64")
PIXEL_ATOL = 0.0 if SAME_RESIZE else 1 / (255 * 0.224) + 1e-6


def assert_pixels_equal(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=PIXEL_ATOL)


def unpack(packed, width):
    """Masks saved with ``np.packbits(..., axis=-1)`` → bool ``(..., H, W)``."""
    return np.unpackbits(packed, axis=-1, count=width).astype(bool)


_processors = {}


def image_processor_for(side):
    """The ``Sam2Processor`` of ``tiny_sam2(side)``, built once per side."""
    if side not in _processors:
        _processors[side] = tiny_sam2(side)[1]
    return _processors[side]


def test_the_fixture_was_made_from_these_inputs():
    # editing make_sam2_reference.cases() without regenerating the fixture would compare unlike things
    assert int(saved["inputs_checksum"]) == sum(int(v.astype(np.int64).sum()) for v in inputs.values())


@pytest.mark.parametrize("name", list(ref.SIZES))
@pytest.mark.parametrize("side", ref.SIDES)
def test_an_image_and_its_points_as_refam_sends_them(side, name):
    processor = image_processor_for(side)
    rgb = inputs[f"image_{name}"]
    points, labels = ref.points(*rgb.shape[:2])
    # what attnlens.refam.refine does: a PIL image, one object, its points in pixels (x, y)
    enc = processor(
        images=Image.fromarray(rgb), input_points=[[points]], input_labels=[[labels]], return_tensors="pt"
    )
    key = f"{side}_{name}"
    assert_pixels_equal(enc["pixel_values"], saved[f"pil_pixel_values_{key}"])
    np.testing.assert_array_equal(enc["original_sizes"], saved[f"pil_original_sizes_{key}"])
    # the points are scaled from the image to the side × side input with the stand-in's original_sizes
    np.testing.assert_array_equal(enc["input_points"], saved[f"input_points_{key}"])
    np.testing.assert_array_equal(enc["input_labels"], saved[f"input_labels_{key}"])
    # a numpy array gives the same pixels as the PIL image
    assert_pixels_equal(processor.image_processor(rgb)["pixel_values"], saved[f"pil_pixel_values_{key}"])


@pytest.mark.parametrize("name", list(ref.MODES))
def test_grey_and_transparent_images_are_made_rgb_first(name):
    side = ref.SIDES[0]
    image = Image.fromarray(inputs[f"image_{name}"])
    assert image.mode == {"grey": "L", "rgba": "RGBA"}[name]
    # grey is repeated into three channels; transparency goes onto white (not simply dropped)
    enc = image_processor_for(side).image_processor(image)
    assert_pixels_equal(enc["pixel_values"], saved[f"pil_pixel_values_{side}_{name}"])


@pytest.mark.parametrize("side", ref.SIDES)
def test_a_batch_of_differently_sized_images(side):
    enc = image_processor_for(side).image_processor([inputs["image_odd"], inputs["image_wide"]])
    one_by_one = [saved[f"pil_pixel_values_{side}_{name}"] for name in ("odd", "wide")]
    assert_pixels_equal(enc["pixel_values"], np.concatenate(one_by_one))
    np.testing.assert_array_equal(enc["original_sizes"], saved[f"batch_original_sizes_{side}"])


@pytest.mark.parametrize("side", ref.SIDES)
def test_objects_with_fewer_points_are_padded(side):
    w = ref.SIZES["wide"][1]
    enc = image_processor_for(side)(
        images=Image.fromarray(inputs["image_wide"]),
        input_points=[[[[10.0, 20.0], [30.5, 40.5]], [[w - 1.0, 0.0]]]],
        input_labels=[[[1, 0], [1]]],
        return_tensors="pt",
    )
    np.testing.assert_array_equal(enc["input_points"], saved[f"two_objects_points_{side}"])
    np.testing.assert_array_equal(enc["input_labels"], saved[f"two_objects_labels_{side}"])


@pytest.mark.parametrize("name", list(ref.SIZES))
@pytest.mark.parametrize("side", ref.SIDES)
def test_masks_come_back_at_the_image_size(side, name):
    processor = image_processor_for(side)
    h, w = ref.SIZES[name]
    low_res = torch.from_numpy(ref.logits(side, 3))[None, None]  # (image, object, candidate, side/4, side/4)
    # what attnlens.refam.refine does with the model's pred_masks and the processor's original_sizes
    masks = processor.image_processor.post_process_masks(low_res, torch.tensor([[h, w]]))[0]
    assert masks.shape == (1, 3, h, w) and masks.dtype == torch.bool
    np.testing.assert_array_equal(masks.numpy(), unpack(saved[f"masks_{side}_{name}"], w))
    if f"mask_logits_{side}_{name}" in saved:  # unthresholded: the same bilinear upsampling
        raw = processor.image_processor.post_process_masks(low_res, [[h, w]], binarize=False)[0]
        np.testing.assert_array_equal(raw.numpy(), saved[f"mask_logits_{side}_{name}"])


@pytest.mark.parametrize("name", list(ref.CLIPS))
def test_a_clip_its_session_and_its_masks_as_refam_sends_them(name):
    model, processor = tiny_sam2(video=True)
    frames = inputs[f"video_{name}"]
    t, h, w = frames.shape[:3]
    enc = processor.video_processor(videos=frames, device="cpu", return_tensors="pt")
    assert_pixels_equal(enc["pixel_values_videos"], saved[f"video_pixel_values_{name}"])
    np.testing.assert_array_equal(enc["original_sizes"], saved[f"video_original_sizes_{name}"])
    np.testing.assert_array_equal(enc["reshaped_input_sizes"], saved[f"video_reshaped_input_sizes_{name}"])

    # what attnlens.refam.refine does: a session on the clip, points on one frame, masks back at its size
    session = processor.init_video_session(video=frames, inference_device=model.device, dtype=model.dtype)
    points, labels = ref.points(h, w)
    processor.add_inputs_to_inference_session(
        inference_session=session,
        frame_idx=t - 1,
        obj_ids=1,
        input_points=[[points]],
        input_labels=[[labels]],
    )
    held = torch.stack([session.get_frame(i) for i in range(t)])
    assert_pixels_equal(held, saved[f"video_pixel_values_{name}"][0])
    np.testing.assert_array_equal([session.video_height, session.video_width], saved[f"session_size_{name}"])
    prompt = session.point_inputs_per_obj[session.obj_id_to_idx(1)][t - 1]
    np.testing.assert_array_equal(prompt["point_coords"], saved[f"session_points_{name}"])
    np.testing.assert_array_equal(prompt["point_labels"], saved[f"session_labels_{name}"])
    low_res = torch.from_numpy(ref.logits(64, 1))[None]  # (object, 1, side/4, side/4): one frame's pred_masks
    masks = processor.post_process_masks([low_res], original_sizes=[[h, w]])[0]
    np.testing.assert_array_equal(masks.numpy(), unpack(saved[f"video_masks_{name}"], w))
