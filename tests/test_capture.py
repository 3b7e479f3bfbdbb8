"""Capturing FLUX attention: exactness, labelling and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnlens
from attnlens.errors import (
    CaptureTooLargeError,
    EmptySpecError,
    HeadIndexError,
    HookError,
    UnknownLayerError,
    UnsupportedModelError,
)
from attnlens.testing import flux_inputs

ATOL = 1e-5


def test_outputs_are_identical_with_and_without_capture(flux):
    inputs = flux_inputs(flux, height=4, width=6, batch=2)
    plain = flux(**inputs).sample
    every = ("cross", "text_to_image", "key_mass", "hidden_norm", "full")
    with attnlens.capture(flux, keep=every):
        captured = flux(**inputs).sample
    assert torch.equal(plain, captured)
    assert torch.equal(flux(**inputs).sample, plain)  # and after detaching


def test_probabilities_equal_an_eager_softmax(flux, eager, normaliser_path):
    inputs = flux_inputs(flux, height=4, width=6, text_len=8, batch=2)
    with attnlens.capture(flux, keep=("cross", "text_to_image", "key_mass", "full")) as cap:
        flux(**inputs)
    ds = cap.result
    assert ds.attrs["capture_paths"] == normaliser_path
    assert list(ds.layer.values) == ["double.0", "double.1", "single.0", "single.1"]
    assert len(eager.probs) == 4
    for i, probs in enumerate(eager.probs):  # (batch, head, seq, seq), text first then image
        layer = ds.isel(step=0, layer=i)
        np.testing.assert_allclose(layer.full, probs, atol=ATOL)
        np.testing.assert_allclose(layer.cross, probs[:, :, 8:, :8], atol=ATOL)
        np.testing.assert_allclose(layer.text_to_image, probs[:, :, :8, 8:], atol=ATOL)
        np.testing.assert_allclose(layer.key_mass, probs.mean(dim=2), atol=ATOL)
    np.testing.assert_allclose(ds.full.sum("key"), 1.0, atol=ATOL)


def test_chunk_size_does_not_change_results(flux):
    inputs = flux_inputs(flux, height=6, width=6)
    results = []
    for chunk_bytes in (1, 2**30):  # one query per chunk, everything at once
        with attnlens.capture(flux, keep=("cross", "key_mass"), chunk_bytes=chunk_bytes) as cap:
            flux(**inputs)
        results.append(cap.result)
    np.testing.assert_allclose(results[0].cross, results[1].cross, atol=1e-6)
    np.testing.assert_allclose(results[0].key_mass, results[1].key_mass, atol=1e-6)


def test_head_selection_and_reduction(flux, eager):
    inputs = flux_inputs(flux, height=4, width=4)
    with attnlens.capture(flux, keep="cross", heads="mean", layers=["single.*", 0]) as cap:
        flux(**inputs)
    ds = cap.result
    assert list(ds.layer.values) == ["double.0", "single.0", "single.1"]
    assert list(ds["head"].values) == ["mean"]
    expected = eager.probs[0][:, :, 8:, :8].mean(dim=1)
    np.testing.assert_allclose(ds.cross.sel(layer="double.0", head="mean").isel(step=0), expected, atol=ATOL)

    with attnlens.capture(flux, keep="cross", heads=[1], layers="double.1") as cap:
        flux(**inputs)
    assert cap.result.cross.sizes["head"] == 1 and int(cap.result["head"][0]) == 1


def test_image_tokens_carry_their_grid_position(flux):
    with attnlens.capture(flux, keep="cross") as cap:
        flux(**flux_inputs(flux, height=3, width=5))
    ds = cap.result
    assert ds.sizes["query"] == 15
    assert (ds.y.values == np.repeat(np.arange(3), 5)).all()
    assert (ds.x.values == np.tile(np.arange(5), 3)).all()
    spatial = ds.cross.set_index(query=["y", "x"]).unstack("query")
    assert dict(spatial.sizes)["y"] == 3 and dict(spatial.sizes)["x"] == 5
    assert set(ds.key_kind.values[0, :8]) == {"text"} and set(ds.key_kind.values[0, 8:]) == {"image"}


def test_repeated_bare_calls_become_samples_and_steps(flux):
    with attnlens.capture(flux, keep="key_mass") as cap:
        for t in (1.0, 0.5, 0.25):  # one sampler pass
            flux(**flux_inputs(flux, timestep=t))
        flux(**flux_inputs(flux, timestep=1.0, seed=1))  # restarts: a new sample
        flux(**flux_inputs(flux, timestep=0.5, seed=1))
        flux(**flux_inputs(flux, timestep=0.25, seed=1))
    ds = cap.result
    assert ds.sizes["sample"] == 2 and ds.sizes["step"] == 3
    np.testing.assert_allclose(ds.timestep, [1000.0, 500.0, 250.0])
    assert not np.allclose(ds.key_mass.isel(sample=0), ds.key_mass.isel(sample=1))


def test_timestep_selection_by_index_and_predicate(flux):
    for selector, expected in (([0, 2], [1000.0, 250.0]), (lambda t: t < 600, [500.0, 250.0])):
        with attnlens.capture(flux, keep="cross", timesteps=selector) as cap:
            for t in (1.0, 0.5, 0.25):
                flux(**flux_inputs(flux, timestep=t))
        np.testing.assert_allclose(cap.result.timestep, expected)
    assert list(cap.result.denoise_step.values) == [1, 2]


def test_pipeline_run_labels_steps_timesteps_and_words(flux_pipe):
    def run():
        generator = torch.Generator().manual_seed(0)
        return flux_pipe(
            "a red mug on the table",
            generator=generator,
            height=16,
            width=16,
            num_inference_steps=3,
            max_sequence_length=16,
            output_type="np",
        ).images

    plain = run()
    with attnlens.capture(flux_pipe, keep=("cross", "hidden_norm")) as cap:
        images = run()
    assert np.array_equal(plain, images)
    ds = cap.result
    assert list(ds.step.values) == [0, 1, 2] and list(ds.denoise_step.values) == [0, 1, 2]
    np.testing.assert_allclose(ds.timestep, flux_pipe.scheduler.timesteps.numpy(), rtol=1e-5)
    assert list(ds.branch.values) == ["cond"] * 3
    assert ds.sizes["query"] == 16 and ds.sizes["key_text"] == 16
    words = ds.word.values[0]
    assert list(words[:6]) == ["a", "red", "mug", "on", "the", "table"]
    kinds = ds.token_kind.values[0]
    assert list(kinds[:7]) == ["stop", "content", "content", "stop", "stop", "content", "special"]
    assert set(kinds[7:]) == {"pad"}
    assert ds.attrs["prompts"] == ["a red mug on the table"]
    assert ds.hidden_norm.dims == ("sample", "step", "layer", "key")


def test_true_cfg_calls_are_labelled_by_branch(flux_pipe):
    with attnlens.capture(flux_pipe, keep="cross") as cap:
        flux_pipe(
            ["a red mug", "a dog"],
            negative_prompt=["blue", "cat"],
            true_cfg_scale=2.0,
            height=16,
            width=16,
            num_inference_steps=2,
            max_sequence_length=16,
            output_type="np",
        )
    ds = cap.result
    assert ds.sizes["sample"] == 2
    assert list(ds.branch.values) == ["cond", "uncond", "cond", "uncond"]
    assert list(ds.denoise_step.values) == [0, 0, 1, 1]
    assert ds.attrs["prompts"] == ["a red mug", "a dog"]


def test_hooks_detach_on_exceptions_and_captures_do_not_nest(flux):
    import diffusers.models.transformers.transformer_flux as module

    original = module.dispatch_attention_fn
    with pytest.raises(KeyboardInterrupt), attnlens.capture(flux, keep="cross"):
        raise KeyboardInterrupt
    assert module.dispatch_attention_fn is original
    assert not flux._forward_pre_hooks and "cache_context" not in vars(flux)

    with attnlens.capture(flux, keep="cross"):
        with pytest.raises(HookError, match="cannot nest"), attnlens.capture(flux, keep="key_mass"):
            pass
        flux(**flux_inputs(flux))
    assert module.dispatch_attention_fn is original


def test_a_forward_that_fails_leaves_the_model_clean(flux):
    import diffusers.models.transformers.transformer_flux as module

    inputs = flux_inputs(flux)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][..., :5]  # wrong width
    with pytest.raises(RuntimeError), attnlens.capture(flux, keep="cross"):
        flux(**inputs)
    assert module.dispatch_attention_fn.__module__ != "attnlens.hooks"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in flux.modules())


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        (dict(layers="double.7"), UnknownLayerError, "valid: double.0, double.1, single.0, single.1"),
        (dict(layers=9), UnknownLayerError, "out of range for 4 layers"),
        (dict(heads=2), HeadIndexError, "the layer has 2 heads"),
        (dict(heads=[]), HeadIndexError, "empty"),
        (dict(heads="median"), EmptySpecError, "'all', 'mean', 'max'"),
        (dict(keep=()), EmptySpecError, "keeps nothing: choose keep from cross"),
        (dict(keep=("attention",)), EmptySpecError, "unknown keep"),
    ],
)
def test_bad_specs_name_the_valid_choices(flux, fields, error, message):
    with pytest.raises(error, match=message):
        attnlens.capture(flux, **fields)
    assert issubclass(error, attnlens.AttnlensError)


def test_unsupported_models_list_what_is_supported():
    with pytest.raises(UnsupportedModelError, match="supported: FluxTransformer2DModel"):
        attnlens.capture(torch.nn.Linear(2, 2), keep="cross")


def test_full_capture_is_refused_above_its_limit(flux):
    cap = attnlens.capture(flux, keep="full", max_full_bytes=10_000)
    with pytest.raises(CaptureTooLargeError, match="above max_full_bytes"), cap:
        flux(**flux_inputs(flux, height=8, width=8))
    with pytest.raises(HookError, match="nothing was captured"):
        _ = cap.result


def test_labels_for_bare_calls(flux):
    from attnlens.testing import tiny_t5_tokenizer

    tok = tiny_t5_tokenizer(model_max_length=8)
    ids = tok("the cat", padding="max_length", max_length=8).input_ids
    labels = attnlens.label_tokens(tok, ids)
    with attnlens.capture(flux, keep="cross", labels=[labels]) as cap:
        flux(**flux_inputs(flux, text_len=8, batch=2))
    assert cap.result.token_kind.values.tolist() == [["stop", "content", "special"] + ["pad"] * 5] * 2
    cap = attnlens.capture(flux, keep="cross", labels=[labels])
    with pytest.raises(attnlens.AttnlensError, match="16 text tokens"), cap:
        flux(**flux_inputs(flux, text_len=16))


def test_hidden_norm_is_the_norm_of_each_block_output(flux):
    outputs = []
    handles = [
        b.register_forward_hook(lambda m, a, out: outputs.append(torch.cat(out, 1).detach()))
        for b in [*flux.transformer_blocks, *flux.single_transformer_blocks]
    ]
    with attnlens.capture(flux, keep="hidden_norm") as cap:
        flux(**flux_inputs(flux, height=2, width=3))
    for h in handles:
        h.remove()
    expected = torch.stack([o.norm(dim=-1) for o in outputs], dim=1)  # (batch, layer, key)
    np.testing.assert_allclose(cap.result.hidden_norm.isel(step=0), expected, rtol=1e-6)


def test_kept_dtype_is_the_requested_one(flux):
    with attnlens.capture(flux, keep=("cross", "key_mass"), dtype=torch.float16) as cap:
        flux(**flux_inputs(flux))
    assert cap.result.cross.dtype == np.float16 and cap.result.key_mass.dtype == np.float16


def test_batched_guidance_rows_keep_their_own_probabilities(flux, eager, monkeypatch, normaliser_path):
    from attnlens.models.flux import FluxAdapter

    # a pipeline that batches [uncond | cond] rows, as SD3's, Mochi's and CogVideoX's do
    monkeypatch.setattr(FluxAdapter, "branches", lambda self, pipeline, layout, kwargs: ("uncond", "cond"))
    with attnlens.capture(flux, keep=("cross", "key_mass", "full"), heads="max") as cap:
        flux(**flux_inputs(flux, height=3, width=5, text_len=8, batch=2))
    ds = cap.result
    assert ds.sizes["sample"] == 1 and list(ds.branch.values) == ["cond", "uncond"]
    for i, probs in enumerate(eager.probs):
        for step, row in ((0, 1), (1, 0)):  # cond is the second row, uncond the first
            got = ds.isel(sample=0, step=step, layer=i, head=0)
            want = probs[row].amax(0)
            np.testing.assert_allclose(got.full, want, atol=ATOL)
            np.testing.assert_allclose(got.cross, want[8:, :8], atol=ATOL)
            np.testing.assert_allclose(got.key_mass, probs[row].mean(1).amax(0), atol=ATOL)
    assert ds.attrs["capture_paths"] == normaliser_path


def test_outputs_stay_bitwise_identical_whatever_the_attention_backend(flux):
    from diffusers.models.attention_dispatch import attention_backend

    inputs = flux_inputs(flux, height=3, width=5)
    with attention_backend("_native_math"):  # SDPA under its math kernel: no kernel lse to read
        plain = flux(**inputs).sample
        with attnlens.capture(flux, keep=("cross", "key_mass")) as cap:
            captured = flux(**inputs).sample
    assert torch.equal(plain, captured)
    assert cap.result.attrs["capture_paths"] == {"lse": ["recompute"], "key_mass": ["recompute"]}
    with attnlens.capture(flux, keep=("cross", "key_mass")) as native:
        flux(**inputs)
    np.testing.assert_allclose(cap.result.cross, native.result.cross, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_backend_that_never_calls_sdpa_keeps_its_outputs_and_the_capture_recomputes(flux):
    from diffusers.models.attention_dispatch import attention_backend

    inputs = flux_inputs(flux, height=3, width=5)
    with (
        torch.no_grad(),
        attention_backend("flex"),
    ):  # flex_attention: dispatch_attention_fn never reaches SDPA
        plain = flux(**inputs).sample
        with attnlens.capture(flux, keep=("cross", "key_mass")) as cap:
            captured = flux(**inputs).sample
        with attnlens.capture(flux, keep="cross", intervene=attnlens.suppress(positions=[2])) as suppressed:
            intervened = flux(**inputs).sample
    assert torch.equal(plain, captured)
    assert cap.result.attrs["capture_paths"] == {"lse": ["recompute"], "key_mass": ["recompute"]}
    with (
        torch.no_grad(),
        attnlens.capture(flux, keep="cross", intervene=attnlens.suppress(positions=[2])) as native,
    ):
        expected = flux(**inputs).sample
    torch.testing.assert_close(
        intervened, expected, atol=1e-5, rtol=1e-5
    )  # the intervention ran through SDPA
    np.testing.assert_allclose(suppressed.result.cross, native.result.cross, atol=1e-6)
    assert (suppressed.result.cross.isel(key_text=2) == 0).all()
