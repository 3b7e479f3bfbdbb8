"""Capturing video DiTs: Mochi, CogVideoX, Wan 2.1/2.2, HunyuanVideo and LTX-Video.

Every model is a tiny random-config diffusers model (configs from diffusers' own tests) over
a non-square token grid of two frames, ``2 × 3 × 5``. The oracle is independent of attnlens:
it records the q, k and mask of every attention call the model makes (a wrapper around the
module's ``dispatch_attention_fn``, or a ``TorchFunctionMode`` for processors that call SDPA
directly), computes ``softmax(QKᵀ/√d + mask)`` in float64 and places each call into the
joint layout the test states per family; tokens a call does not hold are NaN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import attnlens
from attnlens.testing import (
    tiny_cogvideox_transformer,
    tiny_mochi_transformer,
    tiny_t5_tokenizer,
    tiny_wan_transformer,
)

ATOL = 1e-5
FRAMES, ROWS, COLS = 2, 3, 5  # token grid: more than one frame, not square
N_VIDEO = FRAMES * ROWS * COLS
N_TEXT = 8
VALID = (8, 5)  # valid text tokens of the two samples: the second is padded
EVERY = ("cross", "text_to_image", "key_mass", "full", "hidden_norm")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _text_mask() -> torch.Tensor:
    return torch.tensor([[1] * VALID[0], [1] * VALID[1] + [0] * (N_TEXT - VALID[1])])


# -- tiny models, each with keyword inputs over the 2 × 3 × 5 token grid -----------------------------------


def _mochi() -> tuple[torch.nn.Module, dict[str, Any]]:
    model = tiny_mochi_transformer()
    inputs = dict(
        hidden_states=_rand(2, 4, FRAMES, 2 * ROWS, 2 * COLS),  # (batch, channels, frames, height, width)
        encoder_hidden_states=_rand(2, N_TEXT, 16, seed=1),
        timestep=torch.tensor([400.0, 400.0]),
        encoder_attention_mask=_text_mask().bool(),
    )
    return model, inputs


def _cogvideox() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    model = tiny_cogvideox_transformer(max_text_seq_length=N_TEXT)
    rope = get_3d_rotary_pos_embed(
        embed_dim=16, crops_coords=((0, 0), (ROWS, COLS)), grid_size=(ROWS, COLS), temporal_size=FRAMES
    )
    inputs = dict(
        hidden_states=_rand(2, FRAMES, 4, 2 * ROWS, 2 * COLS),  # CogVideoX latents are frame-first
        encoder_hidden_states=_rand(2, N_TEXT, 8, seed=1),
        timestep=torch.tensor([900, 900]),
        image_rotary_emb=rope,
    )
    return model, inputs


def _wan() -> tuple[torch.nn.Module, dict[str, Any]]:
    inputs = dict(
        hidden_states=_rand(2, 16, FRAMES, 2 * ROWS, 2 * COLS),
        timestep=torch.tensor([900, 900]),
        encoder_hidden_states=_rand(2, N_TEXT, 32, seed=1),
    )
    return tiny_wan_transformer(), inputs


def _hunyuan() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    ).eval()
    inputs = dict(
        hidden_states=_rand(2, 4, FRAMES, ROWS, COLS),
        timestep=torch.tensor([900.0, 900.0]),
        encoder_hidden_states=_rand(2, N_TEXT, 16, seed=1),
        encoder_attention_mask=_text_mask().float(),
        pooled_projections=_rand(2, 8, seed=2),
        guidance=torch.tensor([3500.0, 3500.0]),
    )
    return model, inputs


def _ltx() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=16,
    ).eval()
    inputs = dict(
        hidden_states=_ltx_pack(_rand(2, 4, FRAMES, ROWS, COLS)),
        encoder_hidden_states=_rand(2, N_TEXT, 16, seed=1),
        timestep=torch.tensor([900, 900]),
        encoder_attention_mask=_text_mask(),
        num_frames=FRAMES,
        height=ROWS,
        width=COLS,
    )
    return model, inputs


def _ltx_pack(latent: torch.Tensor) -> torch.Tensor:
    """``(batch, channels, frames, height, width)`` → LTX's packed tokens, as its pipeline packs them."""
    from diffusers import LTXPipeline

    return LTXPipeline._pack_latents(latent, patch_size=1, patch_size_t=1)


# -- what the test knows of each family, independently of the adapters -----------------------------------


@dataclass(frozen=True)
class Family:
    """A family as the test states it: layer names, attention modules, joint token order.

    ``order`` is ``"video_text"`` or ``"text_video"``; :func:`_call_positions` maps each
    recorded call of a layer onto that joint order; ``perturb`` shifts the latent patch of one
    ``(frame, y, x)`` token of sample 0.
    """

    build: Callable[[], tuple[torch.nn.Module, dict[str, Any]]]
    layers: tuple[str, ...]
    modules: Callable[[torch.nn.Module], list[torch.nn.Module]]  # the attention modules, in execution order
    order: str
    sdpa: str | None  # module whose dispatch_attention_fn the model calls; None: SDPA directly
    masked_text: bool  # whether padded text keys are removed/masked (else the model attends to them)
    perturb: Callable[[dict[str, Any], tuple[int, int, int]], dict[str, Any]]

    def video(self) -> np.ndarray:
        return np.arange(N_VIDEO) + (N_TEXT if self.order == "text_video" else 0)

    def text(self) -> np.ndarray:
        return np.arange(N_TEXT) + (N_VIDEO if self.order == "video_text" else 0)


def _perturb_5d(channels_first: bool, patch: int) -> Callable:
    def perturb(inputs: dict[str, Any], token: tuple[int, int, int]) -> dict[str, Any]:
        f, y, x = token
        hidden = inputs["hidden_states"].clone()
        if channels_first:
            hidden[0, :, f, y * patch, x * patch] += 3.0
        else:
            hidden[0, f, :, y * patch, x * patch] += 3.0
        return {**inputs, "hidden_states": hidden}

    return perturb


def _perturb_ltx(inputs: dict[str, Any], token: tuple[int, int, int]) -> dict[str, Any]:
    latent = _rand(2, 4, FRAMES, ROWS, COLS)
    latent[0, :, token[0], token[1], token[2]] += 3.0
    return {**inputs, "hidden_states": _ltx_pack(latent)}


TRANSFORMERS = "diffusers.models.transformers."


def _attn(blocks: str, *names: str) -> Callable[[torch.nn.Module], list[torch.nn.Module]]:
    return lambda model: [getattr(block, name) for block in getattr(model, blocks) for name in names]


FAMILIES = {
    "mochi": Family(
        _mochi,
        ("block.0", "block.1"),
        _attn("transformer_blocks", "attn1"),
        "video_text",
        None,
        True,
        _perturb_5d(True, 2),
    ),
    "cogvideox": Family(
        _cogvideox,
        ("block.0", "block.1"),
        _attn("transformer_blocks", "attn1"),
        "text_video",
        None,
        False,
        _perturb_5d(False, 2),
    ),
    "wan": Family(
        _wan,
        ("self.0", "cross.0", "self.1", "cross.1"),
        _attn("blocks", "attn1", "attn2"),
        "text_video",
        TRANSFORMERS + "transformer_wan",
        False,
        _perturb_5d(True, 2),
    ),
    "hunyuanvideo": Family(
        _hunyuan,
        ("double.0", "single.0"),
        lambda m: [b.attn for b in [*m.transformer_blocks, *m.single_transformer_blocks]],
        "video_text",
        TRANSFORMERS + "transformer_hunyuan_video",
        True,
        _perturb_5d(True, 1),
    ),
    "ltx": Family(
        _ltx,
        ("self.0", "cross.0", "self.1", "cross.1"),
        _attn("transformer_blocks", "attn1", "attn2"),
        "text_video",
        TRANSFORMERS + "transformer_ltx",
        True,
        _perturb_ltx,
    ),
}


def _call_positions(family: str, layer: str, n_calls: int) -> list[tuple[slice, np.ndarray, np.ndarray]]:
    """``(rows, query positions, key positions)`` of each recorded call of one layer, in the joint layout."""
    fam = FAMILIES[family]
    video, text = fam.video(), fam.text()
    if family == "mochi":  # one SDPA call per sample over [video | its valid text]
        assert n_calls == 2
        return [
            (slice(r, r + 1), p, p) for r in range(2) for p in [np.concatenate([video, text[: VALID[r]]])]
        ]
    assert n_calls == 1
    if layer.startswith("self."):
        return [(slice(None), video, video)]
    if layer.startswith("cross."):
        return [(slice(None), video, text)]
    joint = np.arange(N_VIDEO + N_TEXT)
    return [(slice(None), joint, joint)]


class Oracle:
    """Records every attention call of a model's attention modules and gives textbook probabilities.

    Calls elsewhere (Mochi's attention pooling of the caption, HunyuanVideo's token refiner)
    are not recorded: module hooks mark when an attention module runs.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fam: Family, model: torch.nn.Module) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.fam = fam
        self.inside = False
        for module in fam.modules(model):  # hooks of a model the test discards
            module.register_forward_pre_hook(lambda *_: setattr(self, "inside", True))
            module.register_forward_hook(lambda *_: setattr(self, "inside", False))
        import importlib

        # the attention function the processors look up when they call it, wrapped below attnlens' own
        heads_first = fam.sdpa is None
        module = torch.nn.functional if heads_first else importlib.import_module(fam.sdpa)
        name = "scaled_dot_product_attention" if heads_first else "dispatch_attention_fn"
        original = getattr(module, name)

        def recording(query, key, value, attn_mask=None, *args, **kwargs):
            if self.inside:
                q, k = (query.transpose(1, 2), key.transpose(1, 2)) if heads_first else (query, key)
                self.calls.append((q.detach().clone(), k.detach().clone(), attn_mask))
            return original(query, key, value, attn_mask, *args, **kwargs)

        monkeypatch.setattr(module, name, recording)

    def run(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        self.calls.clear()
        with torch.no_grad():
            return model(**inputs).sample

    def probs(self, index: int) -> torch.Tensor:
        """``(batch, head, query, key)`` float64 probabilities of recorded call ``index``."""
        q, k, mask = self.calls[index]
        q, k = q.transpose(1, 2).double(), k.transpose(1, 2).double()
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = (
                logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask.double()
            )
        return torch.softmax(logits, dim=-1)


def _expected(family: str, oracle: Oracle, layers: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Joint-layout ``full`` and ``key_mass`` ``(batch, layer, head, ...)`` from the recorded calls."""
    seq = N_VIDEO + N_TEXT
    per_layer = len(oracle.calls) // len(layers)
    full = np.full((2, len(layers), 2, seq, seq), np.nan)
    mass = np.full((2, len(layers), 2, seq), np.nan)
    for i, layer in enumerate(layers):
        calls = range(i * per_layer, (i + 1) * per_layer)
        for call, (rows, q_pos, k_pos) in zip(calls, _call_positions(family, layer, per_layer), strict=True):
            probs = oracle.probs(call).numpy()
            full[rows, i][:, :, q_pos[:, None], k_pos[None, :]] = probs
            mass[rows, i][:, :, k_pos] = probs.mean(axis=2)
    return {"full": full, "key_mass": mass}


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def test_outputs_are_identical_with_and_without_capture(family):
    model, inputs = FAMILIES[family].build()
    with torch.no_grad():
        plain = model(**inputs).sample
        with attnlens.capture(model, keep=EVERY):
            captured = model(**inputs).sample
        after = model(**inputs).sample
    assert torch.equal(plain, captured) and torch.equal(plain, after)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_probabilities_equal_an_eager_softmax(family, monkeypatch, normaliser_path):
    fam = FAMILIES[family]
    model, inputs = fam.build()
    oracle = Oracle(monkeypatch, fam, model)
    with attnlens.capture(model, keep=EVERY) as cap:
        oracle.run(model, inputs)
    ds = cap.result.isel(step=0)
    assert tuple(ds.layer.values) == fam.layers
    assert ds.attrs["family"] == family
    expected = _expected(family, oracle, fam.layers)
    video, text = fam.video(), fam.text()
    full = expected["full"]
    np.testing.assert_allclose(ds.full, full, atol=ATOL)
    np.testing.assert_allclose(ds.key_mass, expected["key_mass"], atol=ATOL)
    np.testing.assert_allclose(ds.cross, full[..., video[:, None], text[None, :]], atol=ATOL)
    np.testing.assert_allclose(ds.text_to_image, full[..., text[:, None], video[None, :]], atol=ATOL)
    # every query row the layer has sums to 1; rows of tokens it does not hold are NaN
    sums = ds.full.sum("key", skipna=True).values
    has_row = ~np.isnan(ds.full.values).all(axis=-1)
    np.testing.assert_allclose(sums[has_row], 1.0, atol=ATOL)
    assert np.isfinite(ds.hidden_norm.values[..., video]).all()
    assert ds.attrs["capture_paths"] == normaliser_path


@pytest.mark.parametrize("family", ["ltx", "wan"])
def test_separate_attention_layers_hold_what_their_calls_hold(family):
    fam = FAMILIES[family]
    model, inputs = fam.build()
    with attnlens.capture(model, keep=EVERY) as cap, torch.no_grad():
        model(**inputs)
    ds = cap.result.isel(step=0)
    video, text = fam.video(), fam.text()
    self_layers, cross_layers = ds.sel(layer=ds.layer_kind == "self"), ds.sel(layer=ds.layer_kind == "cross")
    assert np.isnan(self_layers.cross).all() and np.isnan(self_layers.key_mass[..., text]).all()
    np.testing.assert_allclose(self_layers.key_mass.sum("key", skipna=True), 1.0, atol=ATOL)
    # cross-attention: video queries over text keys only, the whole matrix
    np.testing.assert_allclose(cross_layers.cross.sum("key_text"), 1.0, atol=ATOL)
    assert np.isnan(cross_layers.text_to_image).all() and np.isnan(cross_layers.key_mass[..., video]).all()
    # blocks update the video alone: text states have no norm
    assert np.isnan(ds.hidden_norm[..., text]).all() and np.isfinite(ds.hidden_norm[..., video]).all()


def test_padded_text_is_masked_or_dropped(family):
    fam = FAMILIES[family]
    model, inputs = fam.build()
    with attnlens.capture(model, keep=("cross", "key_mass")) as cap, torch.no_grad():
        model(**inputs)
    ds = cap.result.isel(step=0)
    padded = ds.cross.isel(sample=1, key_text=slice(VALID[1], None)).values
    if family == "mochi":  # dropped from the call: neither query nor key of that sample
        assert np.isnan(padded).all()
        assert np.isfinite(ds.cross.isel(sample=0)).all()
    elif fam.masked_text:  # masked keys: probability 0
        np.testing.assert_allclose(padded[np.isfinite(padded)], 0.0, atol=1e-6)
        assert np.isfinite(padded).any()
    else:  # CogVideoX and Wan attend to padding like any token
        assert (padded[np.isfinite(padded)] > 0).all()


@pytest.mark.parametrize("token", [(1, 2, 3), (0, 1, 4)])
def test_video_tokens_carry_the_grid_position_of_their_latent_patch(family, token, monkeypatch):
    """Perturbing one latent patch changes one query of the first attention call, the token at (f, y, x)."""
    fam = FAMILIES[family]
    model, inputs = fam.build()
    with attnlens.capture(model, keep="cross") as cap, torch.no_grad():
        model(**inputs)
    ds = cap.result
    assert ds.sizes["query"] == N_VIDEO
    f, y, x = np.meshgrid(np.arange(FRAMES), np.arange(ROWS), np.arange(COLS), indexing="ij")
    assert (ds.frame.values == f.ravel()).all() and (ds.y.values == y.ravel()).all()
    assert (ds.x.values == x.ravel()).all()
    spatial = ds.cross.set_index(query=["frame", "y", "x"]).unstack("query")
    assert {k: spatial.sizes[k] for k in ("frame", "y", "x")} == {"frame": FRAMES, "y": ROWS, "x": COLS}

    oracle = Oracle(monkeypatch, fam, model)
    oracle.run(model, inputs)
    before = oracle.calls[0][0][0]  # first call's queries of sample 0: (seq, heads, head_dim)
    oracle.run(model, fam.perturb(inputs, token))
    changed = (oracle.calls[0][0][0] - before).abs().amax(dim=(1, 2)) > 1e-6
    rows = changed.nonzero().flatten().tolist()
    offset = (
        N_TEXT if family == "cogvideox" else 0
    )  # CogVideoX's calls hold [text | video]; the others video first
    assert len(rows) == 1
    query = rows[0] - offset
    assert (int(ds.frame[query]), int(ds.y[query]), int(ds.x[query])) == token


def test_cache_context_names_label_branches():
    model, inputs = FAMILIES["hunyuanvideo"].build()
    with attnlens.capture(model, keep="cross") as cap, torch.no_grad():
        for t in (900.0, 500.0):
            step = {**inputs, "timestep": torch.tensor([t, t])}
            with model.cache_context("cond"):
                model(**step)
            with model.cache_context("uncond"):
                model(**step)
    ds = cap.result
    assert list(ds.branch.values) == ["cond", "uncond", "cond", "uncond"]
    assert list(ds.denoise_step.values) == [0, 0, 1, 1] and ds.sizes["sample"] == 2


def test_wan_image_to_video_cross_attention_keeps_the_text_call(monkeypatch):
    """Wan 2.1 I2V attends to the CLIP image context first and to the (512) text tokens second."""
    model = tiny_wan_transformer(num_layers=1, image_dim=16, added_kv_proj_dim=24)
    inputs = dict(
        hidden_states=_rand(1, 16, 1, 4, 6),
        timestep=torch.tensor([900]),
        encoder_hidden_states=_rand(1, 512, 32, seed=1),
        encoder_hidden_states_image=_rand(1, 5, 16, seed=2),
    )
    oracle = Oracle(monkeypatch, FAMILIES["wan"], model)
    with attnlens.capture(model, keep="cross") as cap:
        oracle.run(model, inputs)
    assert [tuple(c[1].shape[1:2]) for c in oracle.calls] == [(6,), (5,), (512,)]  # self, image context, text
    np.testing.assert_allclose(cap.result.cross.sel(layer="cross.0").isel(step=0), oracle.probs(2), atol=ATOL)


# -- pipelines -------------------------------------------------------------------------------------------


def _t5(tokenizer: Any, d_model: int) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


@pytest.fixture(scope="module")
def mochi_pipe():
    """A MochiPipeline with Mochi's own inverted-sigma schedule (timesteps rise); no VAE: latents out."""
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    tok = tiny_t5_tokenizer(16)
    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        text_embed_dim=32,
        time_embed_dim=4,
        max_sequence_length=16,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    return MochiPipeline(
        scheduler=scheduler, vae=None, text_encoder=_t5(tok, 32), tokenizer=tok, transformer=transformer
    )


def _mochi_run(pipe: Any, guidance_scale: float) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(
            "a red mug on the table",
            height=8 * 2 * ROWS,
            width=8 * 2 * COLS,
            num_frames=6 * (FRAMES - 1) + 1,
            num_inference_steps=2,
            guidance_scale=guidance_scale,
            max_sequence_length=16,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).frames


def test_batched_cfg_rows_become_branches(mochi_pipe):
    mochi_pipe.set_progress_bar_config(disable=True)
    plain = _mochi_run(mochi_pipe, 4.0)
    with attnlens.capture(mochi_pipe, keep=("cross", "key_mass")) as cap:
        latents = _mochi_run(mochi_pipe, 4.0)
    assert torch.equal(plain, latents)
    ds = cap.result
    assert ds.sizes["sample"] == 1 and ds.sizes["query"] == N_VIDEO
    assert list(ds.branch.values) == ["cond", "uncond", "cond", "uncond"]
    assert list(ds.denoise_step.values) == [0, 0, 1, 1]
    timesteps = ds.timestep.values[::2]
    np.testing.assert_allclose(timesteps, mochi_pipe.scheduler.timesteps.numpy(), rtol=1e-5)
    assert timesteps[1] > timesteps[0]  # one sampler pass, although its timesteps rise
    assert list(ds.word.values[0, :6]) == ["a", "red", "mug", "on", "the", "table"]
    assert ds.token_kind.values[0, 7] == "pad"
    # the prompt has 7 valid tokens, the empty negative prompt 1 (</s>): the rest is dropped
    cond, uncond = ds.cross.sel(step=ds.branch == "cond"), ds.cross.sel(step=ds.branch == "uncond")
    assert np.isfinite(cond[..., :7]).all() and np.isnan(cond[..., 7:]).all()
    assert np.isfinite(uncond[..., :1]).all() and np.isnan(uncond[..., 1:]).all()
    assert not np.allclose(cond[..., 0], uncond[..., 0])  # the branches attend to different texts


def test_unguided_batches_are_all_cond(mochi_pipe):
    mochi_pipe.set_progress_bar_config(disable=True)
    with attnlens.capture(mochi_pipe, keep="cross") as cap:
        _mochi_run(mochi_pipe, 1.0)
    assert list(cap.result.branch.values) == ["cond", "cond"] and cap.result.sizes["sample"] == 1


def test_wan22_captures_both_transformers():
    from diffusers import UniPCMultistepScheduler, WanPipeline

    tok = tiny_t5_tokenizer(16)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=_t5(tok, 32),
        vae=None,
        scheduler=scheduler,
        transformer=tiny_wan_transformer(0),
        transformer_2=tiny_wan_transformer(1),
        boundary_ratio=0.875,
    )
    pipe.set_progress_bar_config(disable=True)

    def run() -> torch.Tensor:
        return pipe(
            "a red mug on the table",
            negative_prompt="blue",
            height=8 * 2 * ROWS,
            width=8 * 2 * COLS,
            num_frames=4 * (FRAMES - 1) + 1,
            num_inference_steps=3,
            guidance_scale=4.0,
            max_sequence_length=16,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).frames

    plain = run()
    with attnlens.capture(pipe, keep=("cross", "hidden_norm")) as cap:
        latents = run()
    assert torch.equal(plain, latents)
    ds = cap.result
    boundary = 0.875 * pipe.scheduler.config.num_train_timesteps
    expected = ["transformer" if t >= boundary else "transformer_2" for t in ds.timestep.values]
    assert list(ds.transformer.values) == expected
    assert set(expected) == {"transformer", "transformer_2"}
    assert list(ds.branch.values) == ["cond", "uncond"] * 3
    assert list(ds.layer.values) == ["self.0", "cross.0", "self.1", "cross.1"]
    cross = ds.cross.sel(layer="cross.0")
    assert np.isfinite(cross).all()  # every step holds data, from whichever transformer ran it
    np.testing.assert_allclose(cross.sum("key_text"), 1.0, atol=ATOL)
    assert list(ds.word.values[0, :3]) == ["a", "red", "mug"]
    for transformer in (pipe.transformer, pipe.transformer_2):
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in transformer.modules())
        assert "cache_context" not in vars(transformer)


def test_hunyuan_labels_the_text_left_after_the_template_is_cropped():
    """The pipeline drops the template's first ``crop_start`` tokens: labels describe the ids after it."""
    from types import SimpleNamespace

    from attnlens.models.base import CallLayout
    from attnlens.models.hunyuan import HunyuanVideoAdapter

    tok = tiny_t5_tokenizer(32)
    template, crop_start = "a photo of the", 4  # four template tokens before the prompt
    ids = tok(f"{template} red mug", padding="max_length", max_length=crop_start + N_TEXT).input_ids
    pipe = SimpleNamespace(text_encoder=torch.nn.Identity(), tokenizer=tok)
    layout = CallLayout(
        batch=1,
        timestep=900.0,
        seq_len=N_VIDEO + N_TEXT,
        text=torch.arange(N_VIDEO, N_VIDEO + N_TEXT),
        image=torch.arange(N_VIDEO),
        grid=np.zeros((N_VIDEO, 3), dtype=np.int64),
    )
    (labels,) = HunyuanVideoAdapter().text_labels(pipe, {"text": [torch.tensor([ids])]}, ["red mug"], layout)
    assert len(labels) == N_TEXT
    assert list(labels.word[:2]) == ["red", "mug"] and list(labels.word_index[:2]) == [0, 1]
    assert list(labels.token_kind[:4]) == ["content", "content", "special", "pad"]
