"""Interventions: suppress and redirect through SDPA's own kernel, on every kind of attention call.

The oracle is a float64 textbook intervention installed in place of the attention function
the model calls (``dispatch_attention_fn`` or ``F.scaled_dot_product_attention``): it drops the
selected keys and renormalises (suppress) or moves their mass evenly onto the receiving keys
(redirect), and records the probabilities it used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

import attnlens
from attnlens.errors import LayoutError
from attnlens.interventions import intervened_attention
from attnlens.testing import (
    flux_inputs,
    tiny_cogvideox_transformer,
    tiny_mochi_transformer,
    tiny_sd3,
    tiny_wan_transformer,
)

KEEP_ALL = ("cross", "text_to_image", "key_mass", "full")


def _textbook(q, k, v, mask, drop: list[int], onto: list[int] | None, scale=None):
    """``(output, probabilities)`` of a float64 suppress (``onto=None``) or redirect, SDPA layout."""
    q, k, v = q.double(), k.double(), v.double()
    logits = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask.double()
    p = torch.softmax(logits, dim=-1)
    if drop:
        moved = p[..., drop].sum(-1, keepdim=True)
        p[..., drop] = 0.0
        if onto is None:
            p = p / (1.0 - moved)
        else:
            p[..., onto] += moved / len(onto)
    return p @ v, p.float().detach()


def _reference_dispatch(monkeypatch, drop: list[int], onto: list[int] | None = None) -> list[torch.Tensor]:
    """Replace FLUX's attention by the textbook intervention; returns its probabilities, call by call."""
    import diffusers.models.transformers.transformer_flux as module

    seen: list[torch.Tensor] = []

    def attention(query, key, value, attn_mask=None, *args, **kwargs):
        out, p = _textbook(*(t.transpose(1, 2) for t in (query, key, value)), attn_mask, drop, onto)
        seen.append(p)
        return out.transpose(1, 2).to(value.dtype)

    monkeypatch.setattr(module, "dispatch_attention_fn", attention)
    return seen


def _reference_sdpa(
    monkeypatch, keys: Callable[[int], tuple[list[int], list[int] | None]]
) -> list[torch.Tensor]:
    """Replace ``F.scaled_dot_product_attention`` by the textbook intervention of the keys ``keys(n_key)``."""
    seen: list[torch.Tensor] = []

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        drop, onto = keys(key.shape[2])
        out, p = _textbook(query, key, value, attn_mask, drop, onto, scale)
        seen.append(p)
        return out.to(value.dtype)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    return seen


# -- the kernel ----------------------------------------------------------------------------------


def test_intervened_attention_is_masked_sdpa_or_moved_values_with_gradients():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8, requires_grad=True) for _ in range(3))  # (batch, heads, seq, dim)
    drop = torch.zeros(2, 6, dtype=torch.bool)
    drop[0, 2], drop[1, 4] = True, True
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~drop[:, None, None, :])
    out, lse = intervened_attention(q, k, v, drop=drop)
    assert torch.equal(out, ref)  # the same kernel, the same mask
    for grad, want in zip(
        torch.autograd.grad(out.square().sum(), (q, k, v)),
        torch.autograd.grad(ref.square().sum(), (q, k, v)),
        strict=True,
    ):
        torch.testing.assert_close(grad, want)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(drop[:, None, None, :], -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))

    onto = torch.zeros(2, 6, dtype=torch.bool)
    onto[:, 0] = onto[:, 5] = True
    out, _ = intervened_attention(q, k, v, drop=drop, onto=onto)
    want = torch.stack([_textbook(q[b : b + 1], k[b : b + 1], v[b : b + 1], None, [[2], [4]][b], [0, 5])[0][0]
                        for b in range(2)])  # fmt: skip
    torch.testing.assert_close(out, want.float(), atol=1e-6, rtol=1e-6)


# -- FLUX: joint attention through dispatch_attention_fn -------------------------------------------


def test_suppress_with_nothing_selected_changes_nothing(flux):
    from attnlens.testing import tiny_t5_tokenizer

    inputs = flux_inputs(flux, height=4, width=4, text_len=8, batch=2)
    plain = flux(**inputs).sample
    with attnlens.capture(flux, keep=KEEP_ALL) as cap:
        flux(**inputs)
    tok = tiny_t5_tokenizer(model_max_length=8)
    labels = attnlens.label_tokens(tok, tok("the cat", padding="max_length", max_length=8).input_ids)
    for nothing in (attnlens.suppress(), attnlens.suppress(positions=[]), attnlens.suppress(kind="magnet")):
        with attnlens.capture(flux, keep=KEEP_ALL, labels=[labels], intervene=nothing) as other:
            out = flux(**inputs).sample
        assert torch.equal(out, plain)
        for var in KEEP_ALL:
            assert np.array_equal(other.result[var].values, cap.result[var].values)


def test_suppress_zeroes_the_columns_and_renormalises(flux, monkeypatch):
    inputs = flux_inputs(flux, height=4, width=4, text_len=8, batch=2)
    plain = flux(**inputs).sample
    with attnlens.capture(flux, keep=KEEP_ALL, intervene=attnlens.suppress(positions=[2, 9])) as cap:
        out = flux(**inputs).sample
    ds = cap.result
    assert ds.attrs["intervention"] == {"mode": "suppress", "select": {"positions": [2, 9]}}
    assert ds.attrs["capture_paths"]["lse"] == ["kernel:flash_attention_for_cpu"]
    assert (ds.full.isel(key=[2, 9]) == 0).all() and (ds.key_mass.isel(key=[2, 9]) == 0).all()
    assert (ds.cross.isel(key_text=2) == 0).all() and (ds.text_to_image.isel(key_image=1) == 0).all()
    np.testing.assert_allclose(ds.full.sum("key"), 1.0, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-4)  # output identity no longer holds, by design
    reference = _reference_dispatch(monkeypatch, drop=[2, 9])
    expected = flux(**inputs).sample
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for i, probs in enumerate(reference):
        np.testing.assert_allclose(ds.full.isel(step=0, layer=i), probs, atol=1e-5)
        np.testing.assert_allclose(ds.key_mass.isel(step=0, layer=i), probs.mean(2), atol=1e-5)


def test_redirect_moves_the_mass_onto_the_auxiliary_tokens(flux, monkeypatch):
    inputs = flux_inputs(flux, height=4, width=4, text_len=8, batch=2)
    with attnlens.capture(
        flux, keep=KEEP_ALL, intervene=attnlens.redirect(positions=[3], onto=[5, 6])
    ) as cap:
        out = flux(**inputs).sample
    ds = cap.result
    assert (ds.full.isel(key=3) == 0).all() and (ds.cross.isel(key_text=3) == 0).all()
    np.testing.assert_allclose(ds.full.sum("key"), 1.0, atol=1e-5)
    reference = _reference_dispatch(monkeypatch, drop=[3], onto=[5, 6])
    torch.testing.assert_close(out, flux(**inputs).sample, atol=1e-4, rtol=1e-4)
    for i, probs in enumerate(reference):
        layer = ds.isel(step=0, layer=i)
        np.testing.assert_allclose(layer.full, probs, atol=1e-5)
        np.testing.assert_allclose(layer.key_mass, probs.mean(dim=2), atol=1e-5)
        np.testing.assert_allclose(layer.cross, probs[:, :, 8:, :8], atol=1e-5)
        np.testing.assert_allclose(layer.text_to_image, probs[:, :, :8, 8:], atol=1e-5)
    with attnlens.capture(
        flux, keep="key_mass", heads="mean", intervene=attnlens.redirect(positions=[3], onto=[5, 6])
    ) as cap:
        flux(**inputs)
    np.testing.assert_allclose(cap.result.key_mass.squeeze("head"), ds.key_mass.mean("head"), atol=1e-6)


def test_interventions_act_on_their_layers_only(flux):
    inputs = flux_inputs(flux, height=4, width=4)
    with attnlens.capture(flux, keep="key_mass") as plain:
        flux(**inputs)
    single_only = attnlens.suppress(positions=[2], layers="single.*")
    with attnlens.capture(flux, keep="key_mass", intervene=single_only) as cap:
        out = flux(**inputs).sample
    doubles = ["double.0", "double.1"]  # run before any single block: untouched
    assert np.array_equal(cap.result.key_mass.sel(layer=doubles), plain.result.key_mass.sel(layer=doubles))
    assert (cap.result.key_mass.sel(layer=["single.0", "single.1"]).isel(key=2) == 0).all()
    with attnlens.capture(flux, keep="key_mass", layers="double.0", intervene=single_only) as cap:
        uncaptured = flux(**inputs).sample  # the intervened layers need not be captured
    assert torch.equal(out, uncaptured) and list(cap.result.layer.values) == ["double.0"]


def test_suppressing_padding_in_a_pipeline_every_step(flux_pipe):
    def run(**capture_args):
        with attnlens.capture(flux_pipe, keep="cross", **capture_args) as cap:
            images = flux_pipe(
                "a red mug",
                height=16,
                width=16,
                num_inference_steps=2,
                max_sequence_length=16,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images
        return images, cap.result

    plain, _ = run()
    suppressed, ds = run(intervene=attnlens.suppress(kind="pad"))
    pads = ds.token_kind.values[0] == "pad"
    assert pads.sum() == 12
    assert (ds.cross.isel(key_text=np.flatnonzero(pads)) == 0).all()
    assert not (ds.cross.isel(key_text=np.flatnonzero(~pads)) == 0).any()
    assert not np.array_equal(plain, suppressed)
    later, late = run(intervene=attnlens.suppress(kind="pad"), timesteps=[1])  # step 0 is not captured
    assert np.array_equal(later, suppressed) and late.sizes["step"] == 1


def test_interventions_refuse_what_they_cannot_do(flux):
    inputs = flux_inputs(flux, height=4, width=4)
    with pytest.raises(ValueError, match="give onto="):
        attnlens.redirect(positions=[1], onto=[])
    cases = [
        (attnlens.redirect(positions=[1], onto=[1, 2]), "overlap"),
        (attnlens.suppress(word="the"), "needs token labels"),
        (attnlens.suppress(positions=[99]), "outside the joint sequence of 24 tokens"),
        (attnlens.suppress(kind="text"), None),  # fine: every text token, the image remains
        (attnlens.suppress(kind=("text", "image")), "every key"),
    ]
    for intervention, message in cases:
        cap = attnlens.capture(flux, keep="key_mass", intervene=intervention)
        if message is None:
            with cap:
                flux(**inputs)
            assert (cap.result.key_mass.isel(key=slice(0, 8)) == 0).all()
            continue
        with pytest.raises(LayoutError, match=message), cap:
            flux(**inputs)


# -- models that call SDPA directly, per-sample calls, separate cross-attention --------------------

FRAMES, ROWS, COLS, N_TEXT = 2, 3, 5, 8
N_VIDEO = FRAMES * ROWS * COLS


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sd3():
    model = tiny_sd3()
    inputs = dict(
        hidden_states=_rand(2, 4, 6, 10),
        encoder_hidden_states=_rand(2, N_TEXT, 32, seed=1),
        pooled_projections=_rand(2, 64, seed=2),
        timestep=torch.full((2,), 500.0),
    )
    return model, inputs, 15, "image_text"  # 3 × 5 image tokens, then the text


def _cogvideox():
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    rope = get_3d_rotary_pos_embed(
        embed_dim=16, crops_coords=((0, 0), (ROWS, COLS)), grid_size=(ROWS, COLS), temporal_size=FRAMES
    )
    inputs = dict(
        hidden_states=_rand(2, FRAMES, 4, 2 * ROWS, 2 * COLS),
        encoder_hidden_states=_rand(2, N_TEXT, 8, seed=1),
        timestep=torch.tensor([900, 900]),
        image_rotary_emb=rope,
    )
    return tiny_cogvideox_transformer(max_text_seq_length=N_TEXT), inputs, N_VIDEO, "text_image"


def _mochi():
    mask = torch.tensor([[1] * N_TEXT, [1] * 5 + [0] * (N_TEXT - 5)]).bool()
    inputs = dict(
        hidden_states=_rand(2, 4, FRAMES, 2 * ROWS, 2 * COLS),
        encoder_hidden_states=_rand(2, N_TEXT, 16, seed=1),
        timestep=torch.tensor([400.0, 400.0]),
        encoder_attention_mask=mask,
    )
    return tiny_mochi_transformer(), inputs, N_VIDEO, "image_text"


def _wan():
    inputs = dict(
        hidden_states=_rand(2, 16, FRAMES, 2 * ROWS, 2 * COLS),
        timestep=torch.tensor([900, 900]),
        encoder_hidden_states=_rand(2, N_TEXT, 32, seed=1),
    )
    return tiny_wan_transformer(), inputs, N_VIDEO, "text_image"


MODELS = {"sd3": _sd3, "cogvideox": _cogvideox, "mochi": _mochi, "wan": _wan}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("mode", ["suppress", "redirect"])
def test_every_kind_of_attention_call_intervenes_as_the_textbook_does(family, mode, monkeypatch):
    model, inputs, n_image, order = MODELS[family]()
    text_at = n_image if order == "image_text" else 0  # joint position of the first text token
    drop, onto = [1, 3], ([0, 4] if mode == "redirect" else None)
    positions = {"positions": [text_at + t for t in drop]}
    intervention = (
        attnlens.suppress(**positions)
        if onto is None
        else attnlens.redirect(**positions, onto=[text_at + t for t in onto])
    )
    plain = model(**inputs).sample
    with attnlens.capture(model, keep=("cross", "key_mass", "full"), intervene=intervention) as cap:
        out = model(**inputs).sample
    assert not torch.allclose(out, plain, atol=1e-4)

    def keys(n_key: int) -> tuple[list[int], list[int] | None]:
        """The call's own key indices of the selected text: joint calls, Mochi's [video | valid text],
        Wan's cross-attention over the text alone; none in a call over the video alone."""
        first = {N_VIDEO + N_TEXT: text_at, n_image + N_TEXT: text_at, N_TEXT: 0}.get(n_key)
        if family == "mochi" and n_key > N_VIDEO:
            first = N_VIDEO
        if first is None:
            return [], None
        return [first + t for t in drop], None if onto is None else [first + t for t in onto]

    seen = _reference_sdpa(monkeypatch, keys)
    expected = model(**inputs).sample
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert seen  # the oracle ran
    ds = cap.result.isel(step=0)
    text = ds.key.values[text_at : text_at + N_TEXT]
    dropped = text[drop]
    full = ds.full.values  # (sample, layer, head, query_all, key)
    assert np.nan_to_num(full[..., dropped]).max() == 0.0  # the dropped keys get nothing, anywhere
    assert (np.nan_to_num(ds.key_mass.isel(key=dropped).values) == 0).all()
    rows = np.nansum(full, axis=-1)
    attended = ~np.isnan(full).all(axis=-1) & (rows > 0)
    np.testing.assert_allclose(rows[attended], 1.0, atol=1e-5)  # every row still sums to 1
    assert cap.result.attrs["capture_paths"]["lse"] == ["kernel:flash_attention_for_cpu"]


def test_generic_fallback_intervenes_in_cross_attention(monkeypatch):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()  # fmt: skip
    inputs = dict(
        hidden_states=_rand(1, 4, 8, 12),
        encoder_hidden_states=_rand(1, 6, 32, seed=1),
        timestep=torch.tensor([500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    with pytest.warns(UserWarning, match="no attnlens adapter"):
        cap = attnlens.capture(model, keep="cross", intervene=attnlens.suppress(positions=[2]))
    with cap:
        out = model(**inputs).sample
    _reference_sdpa(monkeypatch, lambda n_key: ([2], None) if n_key == 6 else ([], None))
    torch.testing.assert_close(out, model(**inputs).sample, atol=1e-4, rtol=1e-4)
    cross = cap.result.cross.sel(layer="transformer_blocks.0.attn2").values
    assert (cross[..., 2] == 0).all() and np.allclose(cross.sum(-1), 1.0, atol=1e-5)
