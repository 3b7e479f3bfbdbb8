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
Encode and noise as FLUX.1 (no pooled vector, no guidance embedding), with the pipeline's mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .base import CallLayout, forward_arguments
from .flux import FluxAdapter

__all__ = ["ChromaAdapter"]


class ChromaAdapter(FluxAdapter):
    family = "chroma"
    transformer_classes = ("ChromaTransformer2DModel",)
    sequential_branches = ("cond", "uncond")

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        layout = super().layout(transformer, args, kwargs)
        mask = forward_arguments(transformer, args, kwargs).get("attention_mask")
        n_text = len(layout.text)
        text_mask = (mask[:, :n_text] != 0).detach().cpu() if mask is not None else None
        return dataclasses.replace(layout, text_mask=text_mask)

    def block_hidden(self, output: Any) -> torch.Tensor:
        if isinstance(output, torch.Tensor):  # single-stream: already [text | image]
            return output
        return super().block_hidden(output)

    def prompt_inputs(
        self, pipeline: Any, prompt: str, max_sequence_length: int, guidance: float
    ) -> dict[str, Any]:
        device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
        embeds, text_ids, mask = pipeline.encode_prompt(
            prompt, device=device, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
        )[:3]
        return {"encoder_hidden_states": embeds.to(dtype), "txt_ids": text_ids, "text_mask": mask}

    def forward_inputs(self, pipeline: Any, latent: dict[str, Any], text: dict[str, Any]) -> dict[str, Any]:
        """The pipeline's mask: the text's (the prompt and its first padding token) then every image token."""
        text = dict(text)
        mask = text.pop("text_mask")
        n_image = latent["hidden_states"].shape[1]
        image = torch.ones(mask.shape[0], n_image, dtype=torch.bool, device=mask.device)
        return {**latent, **text, "attention_mask": torch.cat([mask.bool(), image], dim=1)}
