"""Chroma (``ChromaTransformer2DModel``): FLUX.1-schnell's blocks over ``[text | image]``, with masks.

Chroma reuses FLUX's ``FluxAttention`` modules and processor, so its attention goes through
``diffusers.models.transformers.transformer_flux.dispatch_attention_fn`` with post-RoPE
``(batch, seq, heads, head_dim)`` tensors; layers are ``double.N`` and ``single.N``. Unlike
FLUX it masks the T5 padding: the pipeline's ``attention_mask`` ``(batch, text + image)``
keeps the prompt and its first padding token; each block turns it into a ``(batch, 1, seq,
seq)`` mask (outer product), so masked text tokens neither give nor receive attention. The
pipeline builds that mask in the model's float dtype, so SDPA *adds* it (0/1) rather than
masking; attnlens applies the mask exactly as SDPA does. ``text_mask`` marks the masked
positions. The pipeline passes ``timestep / 1000`` and runs guidance as two consecutive calls
per step without ``cache_context``: the first is labelled ``cond``, the second ``uncond``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .base import AttentionLayer, CallLayout, ModelAdapter, forward_arguments, stream_layers

__all__ = ["ChromaAdapter"]


class ChromaAdapter(ModelAdapter):
    family = "chroma"
    transformer_classes = ("ChromaTransformer2DModel",)
    attention_functions = ("diffusers.models.transformers.transformer_flux:dispatch_attention_fn",)
    sequential_branches = ("cond", "uncond")

    def layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        return stream_layers(transformer)

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        given = forward_arguments(transformer, args, kwargs)
        hidden = given.get("hidden_states")
        text = given.get("encoder_hidden_states")
        timestep = given.get("timestep")
        img_ids = given.get("img_ids")
        mask = given.get("attention_mask")
        if hidden is None or text is None or timestep is None:
            raise TypeError(
                "ChromaTransformer2DModel needs hidden_states, encoder_hidden_states and timestep"
            )
        n_text, n_image = text.shape[1], hidden.shape[1]
        if img_ids is not None:
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            yx = ids[:, 1:3].round().long().cpu().numpy()
        else:  # row-major square grid as the pipeline packs it
            side = max(round(n_image**0.5), 1)
            yx = np.stack(np.divmod(np.arange(n_image), side), axis=1)
        grid = np.concatenate([np.zeros((n_image, 1), dtype=np.int64), yx.astype(np.int64)], axis=1)
        return CallLayout(
            batch=hidden.shape[0],
            timestep=float(torch.as_tensor(timestep).flatten()[0].item()) * 1000.0,
            seq_len=n_text + n_image,
            text=torch.arange(n_text),
            image=torch.arange(n_text, n_text + n_image),
            grid=grid,
            text_mask=(mask[:, :n_text] != 0).detach().cpu() if mask is not None else None,
        )

    def block_hidden(self, output: Any) -> torch.Tensor:
        if isinstance(output, torch.Tensor):  # single-stream: already [text | image]
            return output
        encoder_hidden, hidden = output
        return torch.cat([encoder_hidden, hidden], dim=1)
