"""``attnlens.store.plan`` and ``attnlens plan``: the bytes a capture will write, against real writes."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import attnlens
from attnlens.cli import main as cli_main
from attnlens.errors import StoreFullError, UnsupportedModelError
from attnlens.store import StoreWriter, open_store, plan
from attnlens.testing import (
    tiny_cogvideox_pipeline,
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_mochi_pipeline,
    tiny_sd3_pipeline,
    tiny_wan_pipeline,
)

PROMPTS = ("a red mug on the table", "the cat", "two dogs on the grass")


def _on_disk(path) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _run_flux(pipe, store, size=64, steps=2):
    with attnlens.capture(pipe, **store.pop("spec"), store=StoreWriter(**store)) as cap:
        for prompt in PROMPTS:
            pipe(
                prompt,
                height=size,
                width=size,
                num_inference_steps=steps,
                max_sequence_length=16,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            )
    return cap


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        ({"keep": ("cross", "key_mass", "hidden_norm")}, {}),
        ({"keep": "cross", "heads": "mean"}, {"storage_dtype": "float16"}),
        ({"keep": ("cross", "text_to_image"), "heads": [1], "layers": "single.*"}, {"layout": "shards"}),
        ({"keep": "full"}, {"storage_dtype": "bfloat16"}),
    ],
)
def test_plan_predicts_the_bytes_a_capture_writes_within_ten_percent(tmp_path, spec, options):
    pipe = tiny_flux_pipeline(num_layers=1, num_single_layers=1)
    pipe.set_progress_bar_config(disable=True)
    predicted = plan(pipe, height=64, width=64, steps=2, text_tokens=16, samples=3, **spec, **options)
    path = tmp_path / "run.zarr"
    cap = _run_flux(pipe, {"location": path, "spec": dict(spec), **options})
    written = _on_disk(path)
    assert abs(predicted.total / written - 1) < 0.10, (predicted.total, written)
    for name, (sizes, _) in predicted.variables.items():
        assert tuple(sizes.values()) == cap.result[name].shape[1:]
        assert list(sizes) == list(cap.result[name].dims[1:])


def test_plan_of_a_video_pipeline(tmp_path):
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    path = tmp_path / "run.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with attnlens.capture(pipe, keep=("cross", "key_mass"), heads="mean", store=path):
            for prompt in PROMPTS[:2]:
                pipe(
                    prompt,
                    height=48,
                    width=80,
                    num_frames=5,
                    num_inference_steps=2,
                    guidance_scale=4.0,
                    max_sequence_length=16,
                    output_type="latent",
                    generator=torch.Generator().manual_seed(0),
                )
    predicted = plan(
        pipe,
        keep=("cross", "key_mass"),
        heads="mean",
        height=48,
        width=80,
        frames=5,
        steps=2,
        guidance=2,
        text_tokens=16,
        samples=2,
    )
    ds = open_store(path)
    assert predicted.image_tokens == ds.sizes["query"]
    assert abs(predicted.total / _on_disk(path) - 1) < 0.10


@pytest.mark.parametrize(
    ("make", "frames"), [(tiny_cogvideox_pipeline, 9), (tiny_mochi_pipeline, 13), (tiny_wan_pipeline, 9)]
)
def test_adapters_count_the_tokens_their_pipelines_make(make, frames):
    pipe = make()
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings(), attnlens.capture(pipe, keep="key_mass", heads="mean") as cap:
        warnings.simplefilter("ignore")
        pipe(
            "a red mug",
            height=48,
            width=64,
            num_frames=frames,
            num_inference_steps=2,
            max_sequence_length=16,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    predicted = plan(pipe, keep="key_mass", height=48, width=64, frames=frames, steps=2, text_tokens=16)
    assert (predicted.text_tokens, predicted.image_tokens) == (16, cap.result.sizes["query"])


def test_a_pipeline_without_a_vae_or_a_bare_transformer_needs_its_token_count():
    import types

    transformer = tiny_flux_transformer()
    no_vae = types.SimpleNamespace(transformer=transformer)  # a pipeline that does not say its VAE's factor
    with pytest.raises(UnsupportedModelError, match=r"cannot tell how pixels become tokens .*image_tokens"):
        plan(no_vae, keep="cross", height=64, width=64, steps=2, text_tokens=16)
    assert plan(no_vae, keep="cross", image_tokens=60, steps=2, text_tokens=16).image_tokens == 60
    with pytest.raises(UnsupportedModelError, match=r"a bare FluxTransformer2DModel .* give the pipeline"):
        plan(transformer, keep="cross", height=64, width=64, steps=2, text_tokens=16)


def test_plan_of_an_embedded_model_and_of_a_diffusers_folder(tmp_path):
    pipe = tiny_flux_pipeline(num_layers=1, num_single_layers=1)
    pipe.save_pretrained(tmp_path / "pipe")
    options = {"keep": ("cross", "key_mass"), "height": 64, "width": 64, "steps": 4, "text_tokens": 16}
    # the folder's pipeline is built from its configs, on the meta device: no weights are read
    assert plan(str(tmp_path / "pipe"), **options) == plan(pipe, **options)
    pipe.transformer.save_pretrained(tmp_path / "transformer")
    bare = plan(tmp_path / "transformer", keep="cross", image_tokens=256, steps=4, text_tokens=16)
    assert bare.variables["cross"][0]["query"] == 256
    assert plan("shapes-flux", **{**options, "height": 32, "width": 32}).image_tokens == 64  # 8 × 8 patches
    with pytest.raises(UnsupportedModelError, match="holds no diffusers pipeline"):
        plan(str(tmp_path), **options)


def test_plan_counts_the_spec(tmp_path):
    pipe = tiny_flux_pipeline(num_layers=1, num_single_layers=1)
    base = {"height": 64, "width": 64, "steps": 10, "text_tokens": 16}
    every = plan(pipe, keep="cross", **base)
    some = plan(pipe, keep="cross", heads="mean", layers="single.*", timesteps=[0, 5, 99], **base)
    assert every.variables["cross"][0] == {"step": 10, "layer": 2, "head": 2, "query": 256, "key_text": 16}
    assert some.variables["cross"][0] == {"step": 2, "layer": 1, "head": 1, "query": 256, "key_text": 16}
    upper = plan(pipe, keep="cross", timesteps=lambda t: t > 500, **base)
    assert upper.variables["cross"][0]["step"] == 10 and "upper bound" in upper.notes[0]
    assert plan(pipe, keep="cross", guidance=2, **base).variables["cross"][0]["step"] == 20
    half = plan(pipe, keep="cross", dtype=torch.float16, **base)
    assert half.per_sample["cross"] == every.per_sample["cross"] // 2


def test_a_run_that_would_not_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    import attnlens.store.planning as plan_module

    pipe = tiny_flux_pipeline(num_layers=1, num_single_layers=1)
    big = plan(pipe, keep="full", height=1024, width=1024, steps=28, text_tokens=512, samples=1000)
    assert big.total > 2**40
    monkeypatch.setattr(plan_module, "free_bytes", lambda store: 2**40)
    with pytest.raises(
        StoreFullError, match=r"this capture writes .* TiB \(1000 sample\(s\) of .*1\.0 TiB free"
    ):
        big.check(tmp_path / "run.zarr")
    plan(pipe, keep="cross", height=64, width=64, steps=2, text_tokens=16).check(tmp_path / "run.zarr")


def test_cli_plan(capsys):
    args = ["plan", "shapes-flux", "--height", "32", "--width", "32", "--steps", "8", "--text-tokens", "24"]
    assert cli_main([*args, "--keep", "cross", "key_mass", "--heads", "mean", "--samples", "100"]) == 0
    out = capsys.readouterr().out
    for text in ("24 text + 64 image tokens", "cross", "key_mass", "288.0 KiB", "per run of 100"):
        assert text in out, text
    assert (
        cli_main(
            ["plan", "no-such-model", "--height", "64", "--width", "64", "--steps", "1", "--text-tokens", "8"]
        )
        == 2
    )
    assert "holds no diffusers pipeline" in capsys.readouterr().out
    assert cli_main(["plan", "shapes-flux", "--steps", "1", "--text-tokens", "8"]) == 2  # no image size
    assert "give the height and width in pixels (--height, --width)" in capsys.readouterr().out


def test_a_model_of_no_known_family_needs_its_token_count():
    import diffusers

    with torch.device("meta"):  # the positional fallback's model: no weights needed for a plan
        pixart = diffusers.PixArtTransformer2DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8,
            norm_type="ada_norm_single", num_embeds_ada_norm=1000,
        )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            UnsupportedModelError, match=r"bare PixArtTransformer2DModel .* plan\(image_tokens=\.\.\.\)"
        ):
            plan(pixart, keep="cross", height=64, width=96, steps=2, text_tokens=6)
        p = plan(pixart, keep="cross", image_tokens=24, steps=2, text_tokens=6)
    assert p.variables["cross"][0] == {"step": 2, "layer": 4, "head": 3, "query": 24, "key_text": 6}


def test_forwards_per_step_follow_how_each_pipeline_guides():
    from attnlens import zoo
    from attnlens.models.registry import resolve

    def forwards(pipe, **options):
        return resolve(pipe)[0].forwards_per_step(pipe, **options)

    flux, sd3, wan, shapes = tiny_flux_pipeline(), tiny_sd3_pipeline(), tiny_wan_pipeline(), zoo.load()
    assert forwards(flux, guidance_scale=3.5) == 1  # an embedded guidance scale; true_cfg_scale guides
    assert forwards(sd3) == 2 and forwards(sd3, guidance_scale=1.0) == 1  # CFG by default (7.0)
    assert forwards(wan, guidance_scale=5.0) == 2
    assert forwards(shapes) == 1 and forwards(shapes, guidance_scale=2.0) == 2  # against the empty prompt
