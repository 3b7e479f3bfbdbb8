"""CogVideoX (``CogVideoXTransformer3DModel``): joint attention over ``[text | video]``.

Each block (``block.N``) concatenates text and video and attends jointly;
``CogVideoXAttnProcessor2_0`` applies RoPE to the video part of q and k only, then calls
``F.scaled_dot_product_attention`` directly on ``(batch, heads, seq, head_dim)`` tensors,
which attnlens reads through a ``TorchFunctionMode`` scoped to the attention module.

Video tokens are ``patch_size`` × ``patch_size`` patches (and ``patch_size_t`` frames in
CogVideoX 1.5) of each latent frame, frame-major: a ``(frames, height, width)`` latent gives a
``(frames/p_t, height/p, width/p)`` grid. The text is T5's, padded to
``max_text_seq_length`` and not masked. Timesteps are the scheduler's (DDIM/DPM, 0…999). The
pipeline batches CFG as ``[uncond | cond]`` rows under ``cache_context("cond_uncond")``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._video import BatchedCFG, text_inputs, video_grid, video_layout
from .base import AttentionLayer, CallLayout, Geometry, ModelAdapter, forward_arguments, scaled_latents

__all__ = ["CogVideoXAdapter"]


class CogVideoXAdapter(BatchedCFG, ModelAdapter):
    family = "cogvideox"
    transformer_classes = ("CogVideoXTransformer3DModel",)
    attention_functions = ()
    intercept_sdpa = True

    def layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        return [
            AttentionLayer(f"block.{i}", "block", block.attn1, block, block.attn1.heads)
            for i, block in enumerate(transformer.transformer_blocks)
        ]

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        given = forward_arguments(transformer, args, kwargs)
        cfg = transformer.config
        p, p_t = cfg.patch_size, cfg.patch_size_t or 1
        _, frames, _, height, width = given["hidden_states"].shape  # CogVideoX latents are frame-first
        return video_layout(given, video_grid(frames // p_t, height // p, width // p))

    def block_hidden(self, output: Any) -> torch.Tensor:
        hidden, encoder_hidden = output
        return torch.cat([encoder_hidden, hidden], dim=1)

    # -- encode and noise: latents z · scaling_factor, DDPM noising by the scheduler, 3D RoPE --

    def geometry(self, pipeline: Any) -> Geometry:
        cfg = pipeline.transformer.config
        return Geometry(
            pipeline.vae_scale_factor_spatial * cfg.patch_size,
            pipeline.vae_scale_factor_temporal,
            cfg.patch_size_t or 1,
            480,
        )

    def _text_length(self, pipeline: Any, requested: int | None) -> int:
        return pipeline.transformer.config.max_text_seq_length  # the transformer's fixed text length

    def prompt_inputs(
        self, pipeline: Any, prompt: str, max_sequence_length: int, guidance: float
    ) -> dict[str, Any]:
        return text_inputs(pipeline, prompt, max_sequence_length, masked=False)

    def encode_pixels(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        return scaled_latents(pipeline.vae, pixels)

    def noised_inputs(
        self, pipeline: Any, latents: torch.Tensor, noise: torch.Tensor, t: float
    ) -> dict[str, Any]:
        """CogVideoX is a v-prediction DDPM model, not a flow: the clip is noised with the scheduler's
        ``add_noise`` at the training timestep nearest ``t · num_train_timesteps``."""
        transformer = pipeline.transformer
        device, dtype = transformer.device, transformer.dtype
        steps = pipeline.scheduler.config.num_train_timesteps
        timestep = torch.tensor([min(steps - 1, max(0, round(t * steps)))])
        x_t = pipeline.scheduler.add_noise(latents, noise.to(latents.device, latents.dtype), timestep)
        x_t = x_t.permute(0, 2, 1, 3, 4).to(device, dtype)  # CogVideoX latents are frame-first
        _, frames, _, h, w = x_t.shape
        rotary = None
        if transformer.config.use_rotary_positional_embeddings:  # no public function builds them whole
            scale = pipeline.vae_scale_factor_spatial
            rotary = pipeline._prepare_rotary_positional_embeddings(h * scale, w * scale, frames, device)
        return {"hidden_states": x_t, "timestep": timestep.to(device), "image_rotary_emb": rotary}
