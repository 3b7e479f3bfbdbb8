"""FLUX.1 (``FluxTransformer2DModel``): joint attention over ``[text | image]``.

Double-stream blocks (``double.N``) project text and image separately and attend jointly;
single-stream blocks (``single.N``) see the concatenated sequence. Both call
``dispatch_attention_fn`` with post-norm, post-RoPE ``(batch, seq, heads, head_dim)`` tensors.
The pipeline passes ``timestep / 1000``; attnlens labels steps with the scheduler's value.
Image tokens are 2×2-packed latent patches whose ``(y, x)`` come from ``img_ids``.

Encode and noise (:meth:`~attnlens.models.base.ModelAdapter.noised_inputs`): the VAE's mode,
``(z − shift_factor) · scaling_factor``, 2×2 packing, positions from the pipeline's public
``prepare_latents``; the text of ``encode_prompt`` (T5 tokens, CLIP's pooled vector).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import (
    AttentionLayer,
    CallLayout,
    Geometry,
    ModelAdapter,
    flow_noised,
    forward_arguments,
    pack_2x2,
    scaled_latents,
    stream_layers,
)

__all__ = ["FluxAdapter"]


class FluxAdapter(ModelAdapter):
    family = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    attention_functions = ("diffusers.models.transformers.transformer_flux:dispatch_attention_fn",)
    # T5's tokens are the ones concatenated into joint attention (CLIP only gives the pooled vector);
    # pipelines with one encoder, such as attnlens' embedded models, call it text_encoder
    text_encoder_names = (("text_encoder_2", "tokenizer_2"), ("text_encoder", "tokenizer"))

    def layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        return stream_layers(transformer)

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        given = forward_arguments(transformer, args, kwargs)
        hidden = given.get("hidden_states")
        text = given.get("encoder_hidden_states")
        timestep = given.get("timestep")
        img_ids = given.get("img_ids")
        n_text, n_image = text.shape[1], hidden.shape[1]
        if img_ids is not None:
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            yx = ids[:, 1:3].round().long().cpu().numpy()
        else:  # row-major square grid as the pipeline packs it
            side = round(n_image**0.5)
            yx = np.stack(np.divmod(np.arange(n_image), max(side, 1)), axis=1)
        grid = np.concatenate([np.zeros((n_image, 1), dtype=np.int64), yx.astype(np.int64)], axis=1)
        t = torch.as_tensor(timestep).flatten()[0].item()
        return CallLayout.concatenated(
            hidden.shape[0],
            float(t) * 1000.0,
            n_text,
            grid,
        )

    def block_hidden(self, output: Any) -> torch.Tensor:
        encoder_hidden, hidden = output
        return torch.cat([encoder_hidden, hidden], dim=1)

    # -- encode and noise -----------------------------------------------------------------------

    def geometry(self, pipeline: Any) -> Geometry:
        return Geometry(pipeline.vae_scale_factor * 2)

    def prompt_inputs(
        self, pipeline: Any, prompt: str, max_sequence_length: int, guidance: float
    ) -> dict[str, Any]:
        device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
        embeds, pooled, text_ids = pipeline.encode_prompt(
            prompt, prompt_2=prompt, device=device, max_sequence_length=max_sequence_length
        )
        inputs = {
            "encoder_hidden_states": embeds.to(dtype),
            "pooled_projections": pooled.to(dtype),
            "txt_ids": text_ids,
        }
        if pipeline.transformer.config.guidance_embeds:
            inputs["guidance"] = torch.full((1,), float(guidance), device=device)
        return inputs

    def encode_pixels(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        return scaled_latents(pipeline.vae, pixels)

    def noised_inputs(
        self, pipeline: Any, latents: torch.Tensor, noise: torch.Tensor, t: float
    ) -> dict[str, Any]:
        device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
        _, channels, h, w = latents.shape
        if 4 * channels != pipeline.transformer.config.in_channels:
            raise UnsupportedModelError(
                f"this {type(pipeline.transformer).__name__} reads {pipeline.transformer.config.in_channels} "
                f"channels per token, not the {4 * channels} of an image alone (a Fill, Depth or Canny model "
                "needs its conditioning): attnlens encodes plain text-to-image FLUX models"
            )
        x_t = pack_2x2(flow_noised(latents, noise, t)).to(device, dtype)
        step = pipeline.vae_scale_factor
        hidden, img_ids = pipeline.prepare_latents(
            1, channels, h * step, w * step, dtype, device, None, latents=x_t
        )
        return {
            "hidden_states": hidden,
            "img_ids": img_ids,
            "timestep": torch.full((1,), float(t), device=device, dtype=dtype),
        }
