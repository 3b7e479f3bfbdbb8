"""RefAM end to end on tiny random pipelines of every family whose adapter encodes and noises.

Each family's adapter encodes the image (clip) with the pipeline's VAE, noises it, and encodes the
prompt with the pipeline's own ``encode_prompt``; the target word's positions are found among the
labels of the text keys the transformer really sees (SD3: in CLIP's 77 tokens and in T5's).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlens import refam, testing
from attnlens.models.base import pack_2x2

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

IMAGE_FAMILIES = {
    "flux": testing.tiny_flux_pipeline,
    "flux2": testing.tiny_flux2_klein_pipeline,
    "sd3": testing.tiny_sd3_pipeline,
    "qwenimage": testing.tiny_qwen_pipeline,
    "chroma": testing.tiny_chroma_pipeline,
}
VIDEO_FAMILIES = {
    "wan": testing.tiny_wan_pipeline,
    "cogvideox": testing.tiny_cogvideox_pipeline,
    "mochi": testing.tiny_mochi_pipeline,
    "hunyuanvideo": testing.tiny_hunyuan_pipeline,
    "ltx": testing.tiny_ltx_pipeline,
}
IMAGE = np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)  # not square, not a multiple


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_segment_runs_on_every_image_family(family):
    pipe = IMAGE_FAMILIES[family]()
    r = refam.segment(IMAGE, "the red mug on the left", model=pipe, resolution=32)
    assert r.mask.shape == r.heatmap.shape == (37, 45) and r.mask.any()
    assert np.isfinite(r.heatmap).all() and 0.5 < r.heatmap.max() <= 1.0
    words = {str(r.prompt.labels.word[i]) for i in r.prompt.target}
    assert words == {"mug"}
    magnets = {str(r.prompt.labels.word[i]) for i in r.prompt.magnet}
    assert magnets == {"the", "of", "and", "white"}
    again = refam.segment(IMAGE, "the red mug on the left", model=pipe, resolution=32)
    assert (again.mask == r.mask).all()  # one seed, one noise, one mask


def test_sd3_aggregates_the_target_in_both_text_encoders():
    r = refam.segment(IMAGE, "the mug", model=testing.tiny_sd3_pipeline(), resolution=32, gas="none")
    assert len(r.prompt.labels) == 77 + 16  # [77 CLIP | T5]
    assert [i < 77 for i in r.prompt.target] == [True, False]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_segment_video_runs_on_every_video_family(family):
    clip = np.random.default_rng(1).integers(0, 256, (5, 37, 45, 3), dtype=np.uint8)
    r = refam.segment_video(clip, "the red mug", model=VIDEO_FAMILIES[family](), resolution=32)
    assert r.masks.shape == r.heatmaps.shape == (5, 37, 45)
    assert r.masks.any(axis=(1, 2)).all()  # never a silent empty frame
    token_frames = r.maps["token_frame"].values
    assert token_frames[0] == 0 and (np.diff(token_frames) >= 0).all()  # the first frame is encoded alone
    assert {str(r.prompt.labels.word[i]) for i in r.prompt.target} == {"mug"}


def test_packing_is_the_one_flux_and_qwen_image_pipelines_use():
    from diffusers import FluxPipeline, QwenImagePipeline

    latents = torch.randn(1, 3, 6, 8)
    assert torch.equal(pack_2x2(latents), FluxPipeline._pack_latents(latents, 1, 3, 6, 8))
    assert torch.equal(pack_2x2(latents), QwenImagePipeline._pack_latents(latents[:, :, None], 1, 3, 6, 8))


def test_ltx_packing_is_the_pipelines():
    from diffusers import LTXPipeline

    pipe = testing.tiny_ltx_pipeline()
    adapter = __import__("attnlens.models.ltx", fromlist=["LTXVideoAdapter"]).LTXVideoAdapter()
    latents, noise = torch.randn(1, 8, 2, 3, 4), torch.zeros(1, 8, 2, 3, 4)
    packed = adapter.noised_inputs(pipe, latents, noise, 0.0)["hidden_states"]
    assert torch.equal(packed, LTXPipeline._pack_latents(latents, 1, 1))
