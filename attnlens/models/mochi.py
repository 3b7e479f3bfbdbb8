"""Mochi 1 (``MochiTransformer3DModel``): joint attention over ``[video | valid text]`` per sample.

Each block (``block.N``) projects video and text separately and attends jointly, but
``MochiAttnProcessor2_0`` drops each sample's padded text tokens and calls
``F.scaled_dot_product_attention`` once per batch row on ``(1, heads, video + valid text,
head_dim)`` tensors. attnlens reads those calls (a ``TorchFunctionMode`` scoped to the
attention module, so no processor is replaced: ``MochiAttention`` has no ``set_processor``)
and numbers them: call ``i`` is row ``i``. The joint layout keeps the padded length,
``[video | text]``; a padded text token is neither query nor key of its sample, so its
columns and rows are NaN.

Video tokens are ``patch_size × patch_size`` patches of each latent frame, frame-major, so the
grid of a ``(frames, height, width)`` latent is ``(frames, height/p, width/p)``. Mochi's own
scheduler inverts sigmas: the pipeline feeds timesteps that rise from 0 (noise) towards 1000;
attnlens keeps those values and follows a sampler pass in either direction. The pipeline
batches CFG as ``[uncond | cond]`` rows under ``cache_context("cond_uncond")``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ._video import BatchedCFG, _channels, text_inputs, video_grid, video_layout
from .base import (
    REQUIRED,
    AttentionLayer,
    CallLayout,
    Geometry,
    ModelAdapter,
    flow_noised,
    forward_arguments,
    vae_mode,
)

__all__ = ["MochiAdapter"]


class MochiAdapter(BatchedCFG, ModelAdapter):
    family = "mochi"
    transformer_classes = ("MochiTransformer3DModel",)
    attention_functions = ()
    intercept_sdpa = True
    timesteps_may_rise: ClassVar[bool] = True

    def layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        return [
            AttentionLayer(f"block.{i}", "block", block.attn1, block, block.attn1.heads)
            for i, block in enumerate(transformer.transformer_blocks)
        ]

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        given = forward_arguments(transformer, args, kwargs, (*REQUIRED, "encoder_attention_mask"))
        mask = given.get("encoder_attention_mask")
        p = transformer.config.patch_size
        _, _, frames, height, width = given["hidden_states"].shape
        return video_layout(
            given,
            video_grid(frames, height // p, width // p),
            text_first=False,
            text_mask=mask.detach().bool().cpu(),
        )

    def call_rows(self, layer: AttentionLayer, layout: CallLayout, call: int) -> slice | None:
        # the processor loops over the batch: one SDPA call per row, in row order
        return slice(call, call + 1) if call < layout.batch else None

    def call_tokens(
        self, layer: AttentionLayer, layout: CallLayout, n_query: int, n_key: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if layout.text_mask is None or layout.batch != 1:  # call_rows gives each call one row
            raise ValueError(f"{layer.name}: a Mochi attention call holds one sample and its text mask")
        valid = layout.text_mask[0]
        if bool(valid.all()):
            return None  # the whole joint sequence, in its own order
        positions = torch.cat([layout.image, layout.text[valid]])
        if len(positions) != n_query or n_query != n_key:
            raise ValueError(
                f"{layer.name}: a Mochi attention call of {n_query} queries and {n_key} keys does not match "
                f"{len(layout.image)} video + {int(valid.sum())} valid text tokens"
            )
        return positions, positions

    def block_hidden(self, output: Any) -> torch.Tensor:
        hidden, encoder_hidden = output
        return torch.cat([hidden, encoder_hidden], dim=1)

    # -- encode and noise: latents (z − mean) · scaling_factor / std, text with its padding mask --

    max_sequence_length = 256

    def geometry(self, pipeline: Any) -> Geometry:
        vae = pipeline.vae.config
        spatial, temporal = math.prod(vae.spatial_expansions), math.prod(vae.temporal_expansions)
        return Geometry(spatial * pipeline.transformer.config.patch_size, temporal, 1, 480)

    def prompt_inputs(
        self, pipeline: Any, prompt: str, max_sequence_length: int, guidance: float
    ) -> dict[str, Any]:
        return text_inputs(pipeline, prompt, max_sequence_length, masked=True)

    def encode_pixels(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipeline.vae
        z = vae_mode(vae, pixels)
        if getattr(vae.config, "latents_mean", None) is None:
            return z * vae.config.scaling_factor
        mean, std = _channels(vae.config.latents_mean, z), _channels(vae.config.latents_std, z)
        return (z - mean) * vae.config.scaling_factor / std

    def noised_inputs(
        self, pipeline: Any, latents: torch.Tensor, noise: torch.Tensor, t: float
    ) -> dict[str, Any]:
        """Mochi's scheduler inverts sigmas: its transformer reads ``(1 − t) · 1000`` at flow time ``t``."""
        device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
        scheduler = pipeline.scheduler.config
        flow = (1 - t) if scheduler.get("invert_sigmas", False) else t
        return {
            "hidden_states": flow_noised(latents, noise, t).to(device, dtype),
            "timestep": torch.full((1,), flow * scheduler.num_train_timesteps, device=device, dtype=dtype),
        }
