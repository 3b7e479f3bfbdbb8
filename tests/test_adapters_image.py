"""Image-family adapters (SD3/3.5, FLUX.2, Qwen-Image, Chroma) and the generic fallback.

Every model is a tiny random-config diffusers model (the configs of diffusers' own tests);
pipelines get tiny random text encoders and tokenizers built offline. Each family is checked
for unchanged outputs, probabilities equal to an eager ``softmax(QKᵀ/√d)`` (with the model's
own mask), token layout and grid on a non-square latent, timestep values and CFG branches.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import attnlens
from attnlens.errors import EmptySpecError, UnsupportedModelError
from attnlens.models.generic import GenericAdapterWarning
from attnlens.testing import (
    tiny_chroma,
    tiny_chroma_pipeline,
    tiny_flux2,
    tiny_flux2_klein_pipeline,
    tiny_qwen,
    tiny_qwen_pipeline,
    tiny_sd3,
    tiny_sd3_pipeline,
)

ATOL = 1e-5
EVERY = ("cross", "text_to_image", "key_mass", "hidden_norm", "full")


# -- an eager oracle: records softmax(QKᵀ/√d) of every intercepted call, below attnlens --------


class Eager:
    """Installed over an attention function: records dense ``(batch, head, query, key)`` probabilities.

    The mask is applied as SDPA applies it (boolean: keep; float: added), and rows that the
    mask excludes from every key are 0, as attnlens defines them.
    """

    def __init__(self, monkeypatch, module, attr: str, *, heads_first: bool = False) -> None:
        self.probs: list[torch.Tensor] = []
        original = getattr(module, attr)

        def eager(query, key, value, attn_mask=None, *args, **kwargs):
            q, k = (query, key) if heads_first else (query.transpose(1, 2), key.transpose(1, 2))
            logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
            if attn_mask is not None:
                mask = attn_mask if attn_mask.ndim == 4 else attn_mask[:, None, None, :]
                if mask.dtype == torch.bool:
                    logits = logits.masked_fill(~mask, float("-inf"))
                else:
                    logits = logits + mask.double()
            self.probs.append(torch.softmax(logits, dim=-1).nan_to_num(0.0).float().detach())
            return original(query, key, value, attn_mask, *args, **kwargs)

        monkeypatch.setattr(module, attr, eager)


def eager_dispatch(monkeypatch, family_module: str) -> Eager:
    import importlib

    module = importlib.import_module(f"diffusers.models.transformers.{family_module}")
    return Eager(monkeypatch, module, "dispatch_attention_fn")


def eager_sdpa(monkeypatch) -> Eager:
    return Eager(monkeypatch, torch.nn.functional, "scaled_dot_product_attention", heads_first=True)


def check_against(ds, probs: torch.Tensor, layer: str, text: slice, image: slice) -> None:
    """``cross``, ``text_to_image``, ``key_mass`` and ``full`` of one layer against eager probabilities."""
    got = ds.sel(layer=layer).isel(step=0)
    np.testing.assert_allclose(got.full, probs, atol=ATOL)
    np.testing.assert_allclose(got.cross, probs[:, :, image, text], atol=ATOL)
    np.testing.assert_allclose(got.text_to_image, probs[:, :, text, image], atol=ATOL)
    attending = (probs.sum(-1) > 0).sum(-1, keepdim=True).clamp(min=1)
    np.testing.assert_allclose(got.key_mass, probs.sum(2) / attending, atol=ATOL)


# -- tiny models and inputs (diffusers' test configs) -------------------------------------------


def sd3_inputs(height=8, width=12, batch=2, text_len=10, timestep=500.0):
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(batch, 4, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g),
        pooled_projections=torch.randn(batch, 64, generator=g),
        timestep=torch.full((batch,), timestep),
    )


def flux2_inputs(height=3, width=5, text_len=6, reference=None):
    """``reference=(h, w)`` appends a reference image's tokens with ``t = 10`` (FLUX.2 editing)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
    if reference is not None:
        ref = torch.cartesian_prod(
            torch.tensor([10]), torch.arange(reference[0]), torch.arange(reference[1]), torch.arange(1)
        )
        ids = torch.cat([ids, ref])
    txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_len))
    return dict(
        hidden_states=torch.randn(1, len(ids), 4, generator=g),
        encoder_hidden_states=torch.randn(1, text_len, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=ids[None],
        txt_ids=txt[None],
        guidance=torch.tensor([3.5]),
    )


def qwen_inputs(height=4, width=6, text_len=7, valid=(7, 5)):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(len(valid), text_len, dtype=torch.long)
    for row, n in enumerate(valid):
        mask[row, :n] = 1
    return dict(
        hidden_states=torch.randn(len(valid), height * width, 16, generator=g),
        encoder_hidden_states=torch.randn(len(valid), text_len, 16, generator=g),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((len(valid),), 0.5),
        img_shapes=[[(1, height, width)]] * len(valid),
    )


def chroma_inputs(height=3, width=4, text_len=5, valid=(5, 3)):
    """A boolean mask: the masked text tokens neither give nor take attention."""
    g = torch.Generator().manual_seed(0)
    n = height * width
    mask = torch.ones(len(valid), text_len + n, dtype=torch.bool)
    for row, k in enumerate(valid):
        mask[row, k:text_len] = False
    img_ids = torch.zeros(n, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(n) // width, torch.arange(n) % width
    return dict(
        hidden_states=torch.randn(len(valid), n, 4, generator=g),
        encoder_hidden_states=torch.randn(len(valid), text_len, 32, generator=g),
        timestep=torch.full((len(valid),), 0.5),
        img_ids=img_ids,
        txt_ids=torch.zeros(text_len, 3),
        attention_mask=mask,
    )


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()  # fmt: skip


def pixart_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 4, 8, 12, generator=g),
        encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
        timestep=torch.tensor([500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


FAMILIES = {  # family: (model, inputs, expected layer names)
    "sd3": (lambda: tiny_sd3(), sd3_inputs, ["block.0", "block.1"]),
    "sd3.5": (
        lambda: tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm"),
        sd3_inputs,
        ["block.0", "block.0.attn2", "block.1"],
    ),
    "flux2": (tiny_flux2, flux2_inputs, ["double.0", "single.0"]),
    "qwenimage": (tiny_qwen, qwen_inputs, ["block.0", "block.1"]),
    "chroma": (tiny_chroma, chroma_inputs, ["double.0", "single.0"]),
}


# -- every family --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_are_identical_with_and_without_capture(family):
    build, inputs, layers = FAMILIES[family]
    model, given = build(), inputs()
    plain = model(**given).sample
    with attnlens.capture(model, keep=EVERY) as cap:
        captured = model(**given).sample
    assert torch.equal(plain, captured)
    assert torch.equal(model(**given).sample, plain)  # and after detaching
    ds = cap.result
    assert list(ds.layer.values) == layers
    assert ds.attrs["family"] == family.removesuffix(".5")
    assert np.isfinite(ds.hidden_norm.sel(layer=layers[0])).all()


def test_sd3_matches_eager_attention_on_image_then_text(monkeypatch, normaliser_path):
    model, eager = tiny_sd3(), eager_sdpa(monkeypatch)
    with attnlens.capture(model, keep=("cross", "text_to_image", "key_mass", "full")) as cap:
        model(**sd3_inputs(height=8, width=12, text_len=10))
    ds = cap.result
    n_image = 4 * 6  # 8 × 12 latent, 2 × 2 patches
    assert len(eager.probs) == 2 and ds.sizes["query"] == n_image and ds.sizes["key_text"] == 10
    for name, probs in zip(["block.0", "block.1"], eager.probs, strict=True):
        check_against(ds, probs, name, text=slice(n_image, None), image=slice(0, n_image))
    assert list(ds.key_kind.values[0, :n_image]) == ["image"] * n_image
    assert (ds.y.values == np.repeat(np.arange(4), 6)).all() and (
        ds.x.values == np.tile(np.arange(6), 4)
    ).all()
    np.testing.assert_allclose(ds.timestep, [500.0])
    assert cap.result.attrs["capture_paths"] == normaliser_path


def test_sd35_dual_attention_layers_are_image_only(monkeypatch, normaliser_path):
    model, eager = tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm"), eager_sdpa(monkeypatch)
    with attnlens.capture(model, keep=("cross", "key_mass", "full"), heads="mean") as cap:
        model(**sd3_inputs(height=8, width=12, text_len=10))
    ds = cap.result.isel(step=0, head=0)
    assert list(cap.result.layer_kind.values) == ["joint", "self", "joint"]
    joint, image_only = eager.probs[0], eager.probs[1]  # execution order: attn, then attn2
    assert image_only.shape[-1] == 24
    attn2 = ds.sel(layer="block.0.attn2")
    assert np.isnan(attn2.cross).all()  # no text keys in an image-only layer
    np.testing.assert_allclose(attn2.key_mass[:, :24], image_only.mean(1).mean(1), atol=ATOL)
    assert np.isnan(attn2.key_mass[..., 24:]).all()
    np.testing.assert_allclose(attn2.full[..., :24, :24], image_only.mean(1), atol=ATOL)
    assert np.isnan(attn2.full[..., 24:, :]).all()
    np.testing.assert_allclose(ds.sel(layer="block.0").cross, joint.mean(1)[:, :24, 24:], atol=ATOL)
    assert cap.result.attrs["capture_paths"] == normaliser_path


def test_flux2_matches_eager_and_numbers_reference_images_as_frames(monkeypatch, normaliser_path):
    model, eager = tiny_flux2(), eager_dispatch(monkeypatch, "transformer_flux2")
    with attnlens.capture(model, keep=("cross", "text_to_image", "key_mass", "full")) as cap:
        model(**flux2_inputs(height=3, width=5, text_len=6, reference=(2, 2)))
    ds = cap.result
    for name, probs in zip(["double.0", "single.0"], eager.probs, strict=True):
        check_against(ds, probs, name, text=slice(0, 6), image=slice(6, None))
    assert ds.sizes["query"] == 15 + 4
    assert list(ds.frame.values) == [0] * 15 + [1] * 4
    assert list(ds.y.values[:15]) == list(np.repeat(np.arange(3), 5)) and list(ds.x.values[15:]) == [
        0,
        1,
        0,
        1,
    ]
    np.testing.assert_allclose(ds.timestep, [500.0])
    assert cap.result.attrs["capture_paths"] == normaliser_path


def test_flux2_kv_cache_mode_is_refused_clearly():
    model = tiny_flux2()
    with pytest.raises(UnsupportedModelError, match="KV-cache mode"), attnlens.capture(model):
        model(**flux2_inputs(), kv_cache_mode="extract", num_ref_tokens=2)


def test_qwenimage_applies_the_text_padding_mask(monkeypatch, normaliser_path):
    model, eager = tiny_qwen(), eager_dispatch(monkeypatch, "transformer_qwenimage")
    with attnlens.capture(model, keep=("cross", "text_to_image", "key_mass", "full")) as cap:
        model(**qwen_inputs(height=4, width=6, text_len=7, valid=(7, 5)))
    ds = cap.result
    for name, probs in zip(["block.0", "block.1"], eager.probs, strict=True):
        check_against(ds, probs, name, text=slice(0, 7), image=slice(7, None))
    assert (ds.cross.isel(sample=1, key_text=[5, 6]) == 0).all()  # masked padding takes nothing
    assert ds.token_kind.values.tolist() == [["text"] * 7, ["text"] * 5 + ["pad"] * 2]
    assert (ds.y.values == np.repeat(np.arange(4), 6)).all() and (
        ds.x.values == np.tile(np.arange(6), 4)
    ).all()
    np.testing.assert_allclose(ds.timestep, [500.0])
    assert cap.result.attrs["capture_paths"] == normaliser_path


def test_chroma_masked_text_neither_gives_nor_takes_attention(monkeypatch, normaliser_path):
    model, eager = tiny_chroma(), eager_dispatch(monkeypatch, "transformer_flux")
    with attnlens.capture(model, keep=("cross", "text_to_image", "key_mass", "full")) as cap:
        model(**chroma_inputs(height=3, width=4, text_len=5, valid=(5, 3)))
    ds = cap.result
    for name, probs in zip(["double.0", "single.0"], eager.probs, strict=True):
        check_against(ds, probs, name, text=slice(0, 5), image=slice(5, None))
    full = ds.full.isel(step=0, sample=1)
    assert (full.isel(query_all=[3, 4]) == 0).all()  # masked queries: zeros, not NaN
    assert (full.isel(key=[3, 4]) == 0).all()
    assert list(ds.token_kind.values[1]) == ["text"] * 3 + ["pad"] * 2
    assert (ds.y.values == np.repeat(np.arange(3), 4)).all()
    np.testing.assert_allclose(ds.timestep, [500.0])
    assert cap.result.attrs["capture_paths"] == normaliser_path


# -- pipelines: words, timesteps, CFG branches ---------------------------------------------------


def test_sd3_pipeline_labels_batched_cfg_and_both_text_encoders():
    pipe = tiny_sd3_pipeline()

    def run(**extra):
        return pipe(
            ["a red mug on the table", "two dogs"],
            negative_prompt=["blue", ""],
            height=8,
            width=12,
            num_inference_steps=2,
            guidance_scale=3.0,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **extra,
        ).images

    plain = run()
    with attnlens.capture(pipe, keep=("cross", "key_mass"), heads="mean") as cap:
        images = run()
    assert np.array_equal(plain, images)
    ds = cap.result
    assert ds.sizes["sample"] == 2 and ds.sizes["query"] == 96 and ds.sizes["key_text"] == 77 + 16
    assert list(ds.branch.values) == ["cond", "uncond", "cond", "uncond"]
    assert list(ds.denoise_step.values) == [0, 0, 1, 1]
    np.testing.assert_allclose(ds.timestep.values[::2], pipe.scheduler.timesteps.numpy(), rtol=1e-5)
    assert ds.attrs["prompts"] == ["a red mug on the table", "two dogs"]
    clip, t5 = slice(0, 77), slice(77, None)

    def words(row: int, span: slice) -> dict[str, int]:
        pairs = zip(ds.word.values[row][span], ds.word_index.values[row][span], strict=True)
        return {str(w): int(i) for w, i in pairs if i >= 0}

    # one prompt word, one index, whichever encoder tokenized it ("table" is three CLIP pieces)
    expected = {"a": 0, "red": 1, "mug": 2, "on": 3, "the": 4, "table": 5}
    assert words(0, clip) == words(0, t5) == expected
    assert words(1, clip) == words(1, t5) == {"two": 0, "dogs": 1}
    assert list(ds.word.values[0][6:9]) == ["table"] * 3
    kinds = ds.token_kind.values[0]
    assert list(kinds[clip][:10]) == ["special", "stop", "content", "content", "stop", "stop"] + [
        "content"
    ] * 3 + ["special"]
    assert set(kinds[clip][10:]) == {"pad"}
    assert list(kinds[t5][:7]) == ["stop", "content", "content", "stop", "stop", "content", "special"]
    assert set(kinds[t5][7:]) == {"pad"}
    # batched [uncond, cond] rows go to their own steps: the cond step holds the prompt's rows
    cond, uncond = ds.cross.isel(step=0), ds.cross.isel(step=1)
    assert not np.allclose(cond, uncond)
    assert (ds.cross.sum("key_text") <= 1 + ATOL).all()


def test_sd3_skip_layer_guidance_is_its_own_branch_with_skipped_layers_nan():
    pipe = tiny_sd3_pipeline()
    with attnlens.capture(pipe, keep="cross", heads="mean") as cap:
        pipe(
            "a red mug",
            height=8,
            width=12,
            num_inference_steps=3,
            guidance_scale=3.0,
            max_sequence_length=16,
            skip_guidance_layers=[1],
            skip_layer_guidance_start=0.0,
            skip_layer_guidance_stop=1.0,
            output_type="np",
        )
    ds = cap.result
    assert "skip_layers" in set(ds.branch.values)
    skipped = ds.cross.isel(step=list(ds.branch.values).index("skip_layers"))
    assert np.isnan(skipped.sel(layer="block.1")).all() and np.isfinite(skipped.sel(layer="block.0")).all()


def test_chroma_pipeline_labels_consecutive_cfg_calls_and_padding():
    pipe = tiny_chroma_pipeline()

    def run():
        return pipe(
            "a red mug",
            negative_prompt="blue",
            height=12,
            width=16,
            num_inference_steps=2,
            guidance_scale=3.0,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    plain = run()
    with attnlens.capture(pipe, keep=("cross", "key_mass")) as cap:
        images = run()
    assert np.array_equal(plain, images)
    ds = cap.result
    assert ds.sizes["sample"] == 1, "the uncond call must not start a new sample"
    assert list(ds.branch.values) == ["cond", "uncond", "cond", "uncond"]
    assert ds.sizes["query"] == 6 * 8  # a 12 × 16 px image: 2 × 2 packed latent patches
    assert list(ds.word.values[0][:3]) == ["a", "red", "mug"]
    assert list(ds.token_kind.values[0][:5]) == ["stop", "content", "content", "special", "pad"]


def test_flux2_klein_pipeline_labels_cfg_calls_and_the_prompt_inside_its_chat_template():
    pipe = tiny_flux2_klein_pipeline()

    def run():
        return pipe(
            prompt="a red mug",
            height=12,
            width=16,
            num_inference_steps=2,
            guidance_scale=3.0,
            max_sequence_length=32,
            text_encoder_out_layers=(0, 1, 2),
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    plain = run()
    with attnlens.capture(pipe, keep="cross", heads="mean") as cap:
        images = run()
    assert np.array_equal(plain, images)
    ds = cap.result
    assert list(ds.branch.values) == ["cond", "uncond", "cond", "uncond"]
    np.testing.assert_allclose(ds.timestep.values[::2], pipe.scheduler.timesteps.numpy(), rtol=1e-5)
    assert ds.sizes["query"] == 6 * 8 and ds.sizes["key_text"] == 32
    words = [
        (str(w), str(k))
        for w, k, i in zip(ds.word.values[0], ds.token_kind.values[0], ds.word_index.values[0], strict=True)
        if i >= 0
    ]
    assert words == [("a", "stop"), ("red", "content"), ("mug", "content")]
    kinds = ds.token_kind.values[0]
    assert kinds[0] == "special" and kinds[-1] == "pad"  # "<|im_start|>user\n" … padding to 32


def test_qwenimage_pipeline_labels_the_prompt_inside_its_template():
    pipe = tiny_qwen_pipeline()
    with attnlens.capture(pipe, keep="cross", heads="mean") as cap:
        pipe(
            ["a red mug", "the big wooden table"],
            height=32,
            width=48,
            num_inference_steps=2,
            max_sequence_length=256,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    ds = cap.result
    assert ds.sizes["query"] == 4 * 6 and list(ds.branch.values) == ["cond", "cond"]
    np.testing.assert_allclose(ds.timestep, pipe.scheduler.timesteps.numpy(), rtol=1e-5)
    assert (ds.y.values == np.repeat(np.arange(4), 6)).all()
    for row, words in enumerate([["a", "red", "mug"], ["the", "big", "wooden", "table"]]):
        found = {
            int(i): str(w)
            for w, i in zip(ds.word.values[row], ds.word_index.values[row], strict=True)
            if i >= 0
        }
        assert list(found.values()) == words
    # around the prompt: the template's remaining head and closing tokens, then the shorter prompt's padding
    kinds = ds.token_kind.values[0]
    assert kinds[0] == "special" and kinds[-1] == "pad"
    assert set(kinds[ds.word_index.values[0] < 0]) == {"special", "pad"}
    assert ds.token_kind.values[1][-1] == "special"  # the longest prompt: no padding


def test_a_negative_prompt_of_another_length_is_not_captured_but_named():
    pipe = tiny_qwen_pipeline()
    cap = attnlens.capture(pipe, keep="cross", heads="mean")
    with pytest.warns(UserWarning, match="uncond forwards see .* text tokens.*not captured"), cap:
        pipe("a red mug", negative_prompt="blue", true_cfg_scale=2.0, height=32, width=48,
                 num_inference_steps=2, max_sequence_length=256, output_type="latent")  # fmt: skip
    assert list(cap.result.branch.values) == ["cond", "cond"]


# -- the generic fallback and the registry --------------------------------------------------------


def test_generic_fallback_captures_cross_attention_positionally(monkeypatch):
    model, eager = tiny_pixart(), eager_sdpa(monkeypatch)
    given = pixart_inputs()
    plain = model(**given).sample
    with pytest.warns(GenericAdapterWarning, match="no attnlens adapter"):
        cap = attnlens.capture(model, keep=("cross", "key_mass"))
    with cap:
        captured = model(**given).sample
    assert torch.equal(plain, captured)
    ds = cap.result.isel(step=0)
    assert cap.result.attrs["family"] == "generic" and cap.result.attrs["generic_adapter"] is True
    assert "positional" in cap.result.attrs["token_layout"]
    assert list(ds.layer.values) == [f"transformer_blocks.{i}.attn{j}" for i in (0, 1) for j in (1, 2)]
    assert set(ds.token_kind.values[0]) == {"text"}  # positions only: no words
    assert (ds.y.values == np.repeat(np.arange(4), 6)).all()
    self_attn, cross_attn = eager.probs[0], eager.probs[1]  # (1, 3, 24, 24) and (1, 3, 24, 6)
    assert np.isnan(ds.cross.sel(layer="transformer_blocks.0.attn1")).all()
    np.testing.assert_allclose(ds.cross.sel(layer="transformer_blocks.0.attn2"), cross_attn, atol=ATOL)
    np.testing.assert_allclose(
        ds.key_mass.sel(layer="transformer_blocks.0.attn2")[..., :6], cross_attn.mean(2), atol=ATOL
    )
    np.testing.assert_allclose(
        ds.key_mass.sel(layer="transformer_blocks.0.attn1")[..., 6:], self_attn.mean(2), atol=ATOL
    )
    with pytest.raises(EmptySpecError, match="cannot keep"), warnings.catch_warnings():
        warnings.simplefilter("ignore", GenericAdapterWarning)
        attnlens.capture(model, keep=("cross", "hidden_norm"))


def test_generic_fallback_on_a_joint_model_agrees_with_its_adapter(monkeypatch):
    from attnlens.models import registry
    from attnlens.testing import flux_inputs, tiny_flux_transformer

    model = tiny_flux_transformer()
    given = flux_inputs(model, height=3, width=5, text_len=8)
    with attnlens.capture(model, keep=("cross", "key_mass")) as cap:
        model(**given)
    monkeypatch.setattr(registry, "ADAPTERS", ())
    with pytest.warns(GenericAdapterWarning), attnlens.capture(model, keep=("cross", "key_mass")) as generic:
        model(**given)
    assert generic.result.attrs["family"] == "generic"
    np.testing.assert_allclose(generic.result.cross, cap.result.cross, atol=1e-6)
    np.testing.assert_allclose(generic.result.key_mass, cap.result.key_mass, atol=1e-6)


def test_supported_models_list_every_family_with_generic_last():
    families = attnlens.supported_models()
    for family, cls in [
        ("sd3", "SD3Transformer2DModel"),
        ("flux2", "Flux2Transformer2DModel"),
        ("qwenimage", "QwenImageTransformer2DModel"),
        ("chroma", "ChromaTransformer2DModel"),
    ]:
        assert families[family] == (cls,)
    assert list(families)[-1] == "generic"
    with pytest.raises(UnsupportedModelError) as err:
        attnlens.capture(torch.nn.Linear(2, 2))
    for cls in ("FluxTransformer2DModel", "SD3Transformer2DModel", "ChromaTransformer2DModel", "generic"):
        assert cls in str(err.value)
