"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): separate self- and cross-attention.

Each block runs self-attention among video tokens (``self.N``: queries and keys are video)
and then cross-attention from video to text (``cross.N``: queries are video, keys are the
text only, so ``cross`` holds its whole probability matrix). Both go through
``dispatch_attention_fn`` with post-norm, post-RoPE ``(batch, seq, heads, head_dim)`` tensors.
The joint layout of a forward is ``[text | video]``; a self layer has NaN ``cross`` and text
``key_mass``, a cross layer NaN ``text_to_image`` and video ``key_mass``. Block outputs hold
video tokens only, so text ``hidden_norm`` is NaN. Wan 2.1 image-to-video cross-attention
first attends to the CLIP image context (not captured) and then to the text (captured).

Text is UMT5's, zero-padded to ``max_sequence_length`` and not masked. Video tokens are
``patch_size = (p_t, p_h, p_w)`` patches of the latent, frame-major. Timesteps are the
scheduler's; Wan 2.2 TI2V passes one per token and the step's value is their largest.
CFG runs as two forwards under ``cache_context("cond")`` / ``("uncond")``.

Wan 2.2 A14B pipelines hold ``transformer`` (high noise) and ``transformer_2`` (low noise)
and switch at a boundary timestep: capturing the pipeline hooks both; layers keep their
names and each step's ``transformer`` coordinate says which one ran.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._video import SelfCrossAttention, _channels, text_inputs, video_grid, video_layout
from .base import AttentionLayer, CallLayout, Geometry, ModelAdapter, flow_noised, forward_arguments, vae_mode

__all__ = ["WanAdapter"]


class WanAdapter(SelfCrossAttention, ModelAdapter):
    family = "wan"
    transformer_classes = ("WanTransformer3DModel",)
    attention_functions = ("diffusers.models.transformers.transformer_wan:dispatch_attention_fn",)

    def layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        found = []
        for i, block in enumerate(transformer.blocks):
            found.append(AttentionLayer(f"self.{i}", "self", block.attn1, block, block.attn1.heads))
            found.append(AttentionLayer(f"cross.{i}", "cross", block.attn2, block, block.attn2.heads))
        return found

    def transformers(self, transformer: nn.Module, pipeline: Any | None) -> list[tuple[str, nn.Module]]:
        second = getattr(pipeline, "transformer_2", None) if pipeline is not None else None
        if isinstance(second, nn.Module) and second is not transformer:
            return [("transformer", transformer), ("transformer_2", second)]
        return [("transformer", transformer)]

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        given = forward_arguments(transformer, args, kwargs)
        p_t, p_h, p_w = transformer.config.patch_size
        _, _, frames, height, width = given["hidden_states"].shape
        return video_layout(given, video_grid(frames // p_t, height // p_h, width // p_w))

    def call_rows(self, layer: AttentionLayer, layout: CallLayout, call: int) -> slice | None:
        # image-to-video cross-attention attends to the CLIP image context first, the text second
        text_call = (
            1 if layer.kind == "cross" and getattr(layer.module, "add_k_proj", None) is not None else 0
        )
        return slice(None) if call == text_call else None

    # -- encode and noise: latents (z − mean) / std, flow noise, timestep t · 1000 -------------------------

    text_layers = "cross.*"  # self-attention layers hold no text keys

    def geometry(self, pipeline: Any) -> Geometry:
        p_t, p_h, _ = pipeline.transformer.config.patch_size
        return Geometry(pipeline.vae_scale_factor_spatial * p_h, pipeline.vae_scale_factor_temporal, p_t, 480)

    def denoiser(self, pipeline: Any, t: float) -> nn.Module:
        """Wan 2.2 A14B's low-noise ``transformer_2`` below its ``boundary_ratio``, else ``transformer``."""
        boundary = getattr(pipeline.config, "boundary_ratio", None)
        second = getattr(pipeline, "transformer_2", None)
        return (
            second if boundary is not None and second is not None and t < boundary else pipeline.transformer
        )

    def prompt_inputs(
        self, pipeline: Any, prompt: str, max_sequence_length: int, guidance: float
    ) -> dict[str, Any]:
        return text_inputs(pipeline, prompt, max_sequence_length, masked=False)

    def encode_pixels(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        z = vae_mode(pipeline.vae, pixels)
        return (z - _channels(pipeline.vae.config.latents_mean, z)) / _channels(
            pipeline.vae.config.latents_std, z
        )

    def noised_inputs(
        self, pipeline: Any, latents: torch.Tensor, noise: torch.Tensor, t: float
    ) -> dict[str, Any]:
        transformer = self.denoiser(pipeline, t)
        x_t = flow_noised(latents, noise, t).to(transformer.device, transformer.dtype)
        timestep = torch.full(
            (1,), t * pipeline.scheduler.config.num_train_timesteps, device=transformer.device
        )
        if getattr(pipeline.config, "expand_timesteps", False):  # Wan 2.2 TI2V: one timestep per token
            p_t, p_h, p_w = transformer.config.patch_size
            _, _, f, h, w = x_t.shape
            timestep = timestep.expand(1, (f // p_t) * (h // p_h) * (w // p_w))
        return {"hidden_states": x_t, "timestep": timestep}
