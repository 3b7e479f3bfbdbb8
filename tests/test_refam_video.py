"""RefAM for videos: segment_video on tiny random Wan, CogVideoX and Mochi pipelines, the embedded
ShapesPipeline frame by frame, and SAM2 propagation through a clip.

The pipelines are diffusers' own classes with tiny random parts (attnlens.testing): 32 or 48
pixel frames give 2 × 2 or 3 × 3 tokens per latent frame; Wan and CogVideoX compress 4 frames
into one latent frame after the first, Mochi 6.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import attnlens
from attnlens import refam
from attnlens.datasets import shapesref
from attnlens.errors import UnsupportedModelError
from attnlens.refam.image import _filter_sinks
from attnlens.testing import (
    tiny_cogvideox_pipeline,
    tiny_mochi_pipeline,
    tiny_sam2,
    tiny_shapes_pipeline,
    tiny_wan_pipeline,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

EXPRESSION = "the red mug on the left"
BUILDERS = {"wan": tiny_wan_pipeline, "cogvideox": tiny_cogvideox_pipeline, "mochi": tiny_mochi_pipeline}
COMPRESSION = {"wan": 4, "cogvideox": 4, "mochi": 6}  # input frames per latent frame after the first


@pytest.fixture(scope="module")
def pipes():
    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def shapes():
    return tiny_shapes_pipeline()  # the embedded model, untrained: 64 × 64 images, 8 × 8 tokens


def _clip(frames: int, height: int = 37, width: int = 51, seed: int = 0) -> np.ndarray:
    """A random clip ``(frames, height, width, 3)`` uint8 whose frames all differ."""
    return (np.random.default_rng(seed).random((frames, height, width, 3)) * 255).astype(np.uint8)


# -- video DiTs --------------------------------------------------------------------------------------


def test_wan_segments_every_frame_at_the_input_size(pipes):
    r = refam.segment_video(_clip(5), EXPRESSION, model=pipes["wan"], resolution=32, negatives=1)
    assert r.masks.shape == r.heatmaps.shape == (5, 37, 51)
    assert r.masks.dtype == bool and r.heatmaps.dtype == np.float32
    peaks = r.heatmaps.max(axis=(1, 2))
    assert r.heatmaps.min() >= 0.0 and peaks.max() == 1.0 > peaks.min()  # normalised over the whole clip
    assert all(m.any() and not m.all() for m in r.masks)
    # 5 frames → 2 latent frames: frame 0 alone, frames 1–4 together; 32 px → 4 × 4 latents → 2 × 2 tokens
    assert r.maps["target"].dims == ("layer", "frame", "y", "x") and r.maps["heatmap"].dims == (
        "frame",
        "y",
        "x",
    )
    assert list(r.maps.layer.values) == ["cross.0", "cross.1"]  # Wan's self-attention holds no text
    assert r.info["grid"] == (2, 2, 2) and r.info["temporal_compression"] == 4
    assert r.maps["token_frame"].values.tolist() == [0, 1, 1, 1, 1]
    assert all(np.array_equal(r.heatmaps[1], h) for h in r.heatmaps[2:])  # one latent frame, one heatmap
    assert not np.array_equal(r.heatmaps[0], r.heatmaps[1])
    assert len(r.points) == len(r.point_labels) == 5
    for points, labels in zip(r.points, r.point_labels, strict=True):
        assert points.shape == (2, 2) and labels.tolist() == [1, 0]
        assert (points >= 0).all() and (points[:, 0] <= 51).all() and (points[:, 1] <= 37).all()
    # the prior of "left": the right column of tokens keeps only the prior's floor in every frame
    assert np.allclose(r.maps["prior"][:, -1], r.options["prior_floor"])
    assert float(r.maps["heatmap"][:, :, -1].max()) < float(r.maps["heatmap"][:, :, 0].max())
    assert r.expression.head == "mug" and r.options["t"] == 0.5
    assert r.info["refiner"] == ["otsu + largest component"] * 5


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize(
    ("frames", "size"),
    [pytest.param(1, (23, 40), id="1-frame"), pytest.param(2, (31, 17), id="2-frames"), (8, (40, 30))],
)
def test_any_clip_length_and_size_maps_back_to_its_frames(pipes, family, frames, size):
    r = refam.segment_video(_clip(frames, *size), "the cup", model=pipes[family], resolution=32)
    assert r.masks.shape == r.heatmaps.shape == (frames, *size)
    assert all(m.any() for m in r.masks)  # never a silent empty mask
    rate = COMPRESSION[family]
    expected = [-(-i // rate) for i in range(frames)]  # ceil(i / rate): the causal VAE's latent frame
    assert r.maps["token_frame"].values.tolist() == expected
    assert r.maps.sizes["frame"] == expected[-1] + 1 == r.info["grid"][0]


@pytest.mark.parametrize("family", list(BUILDERS))
def test_same_seed_same_masks(pipes, family):
    def run(**kw):
        return refam.segment_video(_clip(5), EXPRESSION, model=pipes[family], resolution=48, **kw)

    first, again, other = run(), run(), run(seed=1)
    assert first.maps.sizes == {"layer": 2, "frame": 2, "y": 3, "x": 3, "input_frame": 5}
    assert np.array_equal(first.masks, again.masks) and np.array_equal(first.heatmaps, again.heatmaps)
    assert not np.array_equal(first.maps["aggregate"].values, other.maps["aggregate"].values)
    two = run(forwards=2)  # two noise draws, averaged
    assert not np.allclose(two.maps["aggregate"].values, first.maps["aggregate"].values)


@pytest.mark.parametrize(("family", "changes"), [("wan", True), ("cogvideox", True), ("mochi", False)])
def test_video_dits_suppress_their_sinks(pipes, family, changes):
    """Video adapters intervene in their attention calls, as image adapters do."""

    def run(**kw):
        return refam.segment_video(_clip(5), "the cup", model=pipes[family], resolution=32, **kw)

    plain, suppressed = run(gas="none"), run(gas="suppress", sinks={"kind": "pad"})
    assert (plain.info["gas_applied"], suppressed.info["gas_applied"]) == ("none", "suppress")
    # Wan and CogVideoX attend to their padding; Mochi drops it from each call: nothing to suppress there
    a, b = plain.maps["aggregate"].values, suppressed.maps["aggregate"].values
    assert (not np.allclose(a, b)) if changes else np.array_equal(a, b)


def test_sink_filter_finds_text_after_the_video():
    """Mochi's joint sequence is ``[video | text]``: joint positions of sinks are not text positions."""
    cross = np.random.default_rng(0).random((1, 6, 4)) * 0.2  # (layer, query, key_text)
    select = attnlens.suppress(positions=[6 + 2]).select  # the third text token, after 6 video tokens
    out = _filter_sinks(cross, select, attnlens.TokenLabels.unknown(4), text_positions=np.arange(6, 10))
    assert (out[..., 2] == 0).all()
    np.testing.assert_allclose(out[..., [0, 1, 3]], cross[..., [0, 1, 3]] / (1 - cross[..., 2:3]))


# -- an image model, frame by frame ------------------------------------------------------------------


def test_shapes_pipeline_runs_frame_by_frame_as_segment_does(shapes):
    rng = np.random.default_rng(0)
    frames = [shapesref.make_scene(rng, n_objects=2).image for _ in range(3)]  # (64, 64, 3) uint8 each
    r = refam.segment_video(frames, "the red circle", model=shapes)
    assert r.masks.shape == r.heatmaps.shape == (3, 64, 64)
    assert r.maps["token_frame"].values.tolist() == [0, 1, 2] and r.info["temporal_compression"] == 1
    assert len(r.info["per_frame"]) == 3
    for i, frame in enumerate(frames):
        alone = refam.segment(frame, "the red circle", model=shapes)
        np.testing.assert_allclose(r.maps["aggregate"].values[i], alone.maps["aggregate"].values)
        np.testing.assert_allclose(r.points[i], alone.points)
        assert np.array_equal(r.masks[i], alone.mask)  # Otsu's threshold ignores the clip-wide normalisation


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([Image.new("RGB", (70, 50), c) for c in ("red", "blue")], id="pil"),
        pytest.param(np.full((2, 50, 70), 120, dtype=np.uint8), id="grey-array"),
        pytest.param(np.random.default_rng(3).random((2, 50, 70, 4)), id="rgba-float"),
    ],
)
def test_any_frame_mode(shapes, frames):
    r = refam.segment_video(frames, "the red circle", model=shapes)
    assert r.masks.shape == (2, 50, 70) and all(m.any() for m in r.masks)


# -- segmenters --------------------------------------------------------------------------------------


def test_sam2_video_propagates_from_the_strongest_frame(shapes):
    model, processor = tiny_sam2(video=True)
    frames = _clip(3, 50, 70, seed=9)
    r = refam.segment_video(frames, "the red circle", model=shapes, segmenter=(model, processor))
    assert r.masks.shape == (3, 50, 70) and r.masks.dtype == bool and all(m.any() for m in r.masks)
    peaks = r.maps["heatmap"].values.max(axis=(1, 2))
    assert r.info["prompt_frame"] == int(np.argmax(peaks)) == 1  # the middle frame: propagated both ways
    assert r.info["refiner"] == ["sam2 video"] * 3  # every frame, before and after the prompted one
    plain = refam.segment_video(frames, "the red circle", model=shapes)
    assert not np.array_equal(r.masks, plain.masks)  # SAM2 drew them, not the threshold refiner
    assert np.array_equal(r.heatmaps, plain.heatmaps)


def test_image_segmenters_run_frame_by_frame(shapes):
    model, processor = tiny_sam2()
    r = refam.segment_video(_clip(2, 50, 70), "the red circle", model=shapes, segmenter=(model, processor))
    assert r.masks.shape == (2, 50, 70) and all(name.startswith("segmenter") for name in r.info["refiner"])


def test_a_grid_of_prompts_runs_frame_by_frame(shapes):
    frames = _clip(2, 50, 70, seed=3)
    r = refam.segment_video(frames, "the red circle", model=shapes, refiner="region", prompts="grid")
    for i in range(2):
        image = refam.segment(frames[i], "the red circle", model=shapes, refiner="region", prompts="grid")
        np.testing.assert_array_equal(r.masks[i], image.mask)
        np.testing.assert_array_equal(r.points[i], image.points)
    with pytest.raises(refam.SegmenterMismatchError, match="video segmenter takes the peaks"):
        refam.segment_video(
            frames, "the red circle", model=shapes, segmenter=tiny_sam2(video=True), prompts="grid"
        )


def test_mismatched_segmenters_are_refused(shapes):
    video_model, video_processor = tiny_sam2(video=True)
    image_model, image_processor = tiny_sam2()
    clip = _clip(2, 20, 30)
    for segmenter in [
        (video_model, image_processor),
        (image_model, video_processor),
        (video_processor, video_model),
        video_model,  # no processor
        "sam2",
    ]:
        with pytest.raises(refam.SegmenterMismatchError):
            refam.segment_video(clip, "the red circle", model=shapes, segmenter=segmenter)
    with pytest.raises(refam.SegmenterMismatchError, match="segment_video"):
        refam.segment(clip[0], "the red circle", model=shapes, segmenter=(video_model, video_processor))


# -- bad input ---------------------------------------------------------------------------------------


def test_bad_clips_raise_clear_errors(shapes):
    for empty in (np.zeros((0, 16, 16, 3), dtype=np.uint8), []):
        with pytest.raises(refam.EmptyVideoError, match="no frames"):
            refam.segment_video(empty, "the red circle", model=shapes)
    assert issubclass(refam.EmptyVideoError, refam.RefamError)
    with pytest.raises(refam.RefamError, match="one size"):
        refam.segment_video([np.zeros((8, 8, 3)), np.zeros((8, 9, 3))], "the red circle", model=shapes)
    with pytest.raises(refam.RefamError, match="looks like"):
        refam.segment_video(np.zeros((40, 50, 3), dtype=np.uint8), "the red circle", model=shapes)
    with pytest.raises(refam.RefamError, match="sequence of frames"):
        refam.segment_video(Image.new("RGB", (8, 8)), "the red circle", model=shapes)


def test_bad_expressions_and_models_raise_clear_errors(shapes, pipes):
    clip = _clip(1, 16, 16)
    with pytest.raises(refam.NoNounError):
        refam.segment_video(clip, "the one on the left", model=shapes, parser="rules")
    with pytest.raises(refam.EmptyExpressionError):
        refam.segment_video(clip, " ", model=shapes)
    with pytest.raises(UnsupportedModelError, match="HunyuanVideo"):
        refam.segment_video(clip, "the cup", model=object())
    wan = pipes["wan"]
    without_vae = type(wan)(wan.tokenizer, wan.text_encoder, None, wan.scheduler, transformer=wan.transformer)
    with pytest.raises(UnsupportedModelError, match="VAE"):
        refam.segment_video(clip, "the cup", model=without_vae)
    with pytest.raises(refam.RefamError, match="cross"):
        refam.segment_video(clip, "the cup", model=wan, resolution=32, layers="self.*", gas="none")
    with pytest.raises(TypeError, match="unknown RefAM option"):
        refam.segment_video(clip, "the cup", model=shapes, frames_per_latent=4)
