"""LTX-Video (``LTXVideoTransformer3DModel``): separate self- and cross-attention.

Each block runs self-attention among video tokens (``self.N``) and then cross-attention from
video to text (``cross.N``: keys are the text only, so ``cross`` is its whole probability
matrix). Both go through ``dispatch_attention_fn`` with post-norm, post-RoPE ``(batch, seq,
heads, head_dim)`` tensors; cross-attention gets the padding mask as an additive bias
(-10000 on padded text keys, so their probability is 0 up to float32 rounding). The joint
layout is ``[text | video]``: a self layer has NaN ``cross`` and text ``key_mass``, a cross
layer NaN ``text_to_image`` and video ``key_mass``; block outputs hold video only, so text
``hidden_norm`` is NaN.

``hidden_states`` arrive packed, ``(batch, tokens, channels)``, frame-major; the pipeline
passes the token grid as ``num_frames``, ``height`` and ``width`` (or, in the conditioning
pipelines, ``video_coords``, whose distinct values per axis give the grid). Timesteps are the
scheduler's (flow matching, 1000 → 0); image-to-video passes one per token, 0 on the
conditioning frame, and the step's value is their largest. The pipeline batches CFG as
``[uncond | cond]`` rows under ``cache_context("cond_uncond")``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._video import (
    BatchedCFG,
    SelfCrossAttention,
    _channels,
    grid_from_coords,
    text_inputs,
    video_grid,
    video_layout,
)
from .base import AttentionLayer, CallLayout, Geometry, ModelAdapter, flow_noised, forward_arguments, vae_mode

__all__ = ["LTXVideoAdapter"]


class LTXVideoAdapter(BatchedCFG, SelfCrossAttention, ModelAdapter):
    family = "ltx"
    transformer_classes = ("LTXVideoTransformer3DModel",)
    attention_functions = ("diffusers.models.transformers.transformer_ltx:dispatch_attention_fn",)

    def layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        found = []
        for i, block in enumerate(transformer.transformer_blocks):
            found.append(AttentionLayer(f"self.{i}", "self", block.attn1, block, block.attn1.heads))
            found.append(AttentionLayer(f"cross.{i}", "cross", block.attn2, block, block.attn2.heads))
        return found

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        given = forward_arguments(transformer, args, kwargs)
        n_video = given["hidden_states"].shape[1]
        if given.get("video_coords") is not None:
            grid = grid_from_coords(given.get("video_coords")[0])
        elif None not in (given.get("num_frames"), given.get("height"), given.get("width")):
            grid = video_grid(int(given.get("num_frames")), int(given.get("height")), int(given.get("width")))
        else:
            raise TypeError("LTXVideoTransformer3DModel needs num_frames, height and width (or video_coords)")
        if len(grid) != n_video:
            raise ValueError(f"a token grid of {len(grid)} tokens does not match {n_video} video tokens")
        mask = given.get("encoder_attention_mask")
        return video_layout(
            given,
            grid,
            # a 2-D mask is 1 where text is real; a 3-D one is already the additive bias
            text_mask=mask.detach().bool().cpu() if mask is not None and mask.ndim == 2 else None,
        )

    # -- encode and noise: latents (z − mean) · scaling_factor / std, packed frame-major --

    text_layers = "cross.*"  # self-attention layers hold no text keys
    max_sequence_length = 128
    #: frames per second that the pipeline's rotary positions assume by default
    frame_rate = 25

    def geometry(self, pipeline: Any) -> Geometry:
        p, p_t = pipeline.transformer_spatial_patch_size, pipeline.transformer_temporal_patch_size
        return Geometry(
            pipeline.vae_spatial_compression_ratio * p, pipeline.vae_temporal_compression_ratio, p_t, 480
        )

    def prompt_inputs(
        self, pipeline: Any, prompt: str, max_sequence_length: int, guidance: float
    ) -> dict[str, Any]:
        return text_inputs(pipeline, prompt, max_sequence_length, masked=True)

    def encode_pixels(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipeline.vae
        z = vae_mode(vae, pixels)
        return (
            (z - _channels(vae.latents_mean, z)) * vae.config.scaling_factor / _channels(vae.latents_std, z)
        )

    def noised_inputs(
        self, pipeline: Any, latents: torch.Tensor, noise: torch.Tensor, t: float
    ) -> dict[str, Any]:
        device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
        p, p_t = pipeline.transformer_spatial_patch_size, pipeline.transformer_temporal_patch_size
        x_t = flow_noised(latents, noise, t)
        b, c, f, h, w = x_t.shape
        # tokens of p_t × p × p patches, frame-major then row-major, channels (c, dt, dy, dx): LTX's packing
        patches = x_t.reshape(b, c, f // p_t, p_t, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        temporal, spatial = pipeline.vae_temporal_compression_ratio, pipeline.vae_spatial_compression_ratio
        return {
            "hidden_states": patches.reshape(b, -1, c * p_t * p * p).to(device, dtype),
            "timestep": torch.full((1,), float(t) * 1000.0, device=device, dtype=dtype),
            "num_frames": f // p_t,
            "height": h // p,
            "width": w // p,
            "rope_interpolation_scale": (temporal / self.frame_rate, spatial, spatial),
        }
