"""FLUX.1 (``FluxTransformer2DModel``): joint attention over ``[text | image]``.

Double-stream blocks (``double.N``) project text and image separately and attend jointly;
single-stream blocks (``single.N``) see the concatenated sequence. Both call
``dispatch_attention_fn`` with post-norm, post-RoPE ``(batch, seq, heads, head_dim)`` tensors.
The pipeline passes ``timestep / 1000``; attnlens labels steps with the scheduler's value.
Image tokens are 2×2-packed latent patches whose ``(y, x)`` come from ``img_ids``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .base import AttentionLayer, CallLayout, ModelAdapter, forward_arguments, stream_layers

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

    def token_counts(
        self, transformer: nn.Module, pipeline: Any | None, *, height: int, width: int, frames: int, text: int
    ) -> tuple[int, int]:
        side = getattr(getattr(pipeline, "config", None), "patch", None)
        if side is None:
            return super().token_counts(
                transformer, pipeline, height=height, width=width, frames=frames, text=text
            )
        return text, (height // side) * (width // side)  # attnlens' embedded ShapesPipeline patches pixels
