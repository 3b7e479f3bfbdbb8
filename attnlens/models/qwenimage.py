"""Qwen-Image (``QwenImageTransformer2DModel``): joint attention over ``[text | image]``.

Every block is double-stream (``block.N``): text and image are projected separately, RoPE'd
and concatenated text first, then passed to ``dispatch_attention_fn`` with a key padding mask
built from ``encoder_hidden_states_mask`` (``(batch, 1, 1, seq)``, True = attend). The text is
the hidden state of Qwen2.5-VL over a chat template with the prompt inside; the pipeline drops
the template's first ``prompt_template_encode_start_idx`` tokens (34) and keeps the rest, so
the text span holds the prompt followed by the template's closing tokens (``special``) and
padding up to the longest prompt of the batch (``pad``, masked out). Image tokens are 2×2
latent patches in row-major order; ``img_shapes`` gives ``(frames, h, w)`` of each image,
and edit pipelines append their reference images after the generated one (frames ``1, …``).
Pipelines pass ``timestep / 1000`` and run guidance as two calls under
``cache_context("cond"/"uncond")``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .base import (
    AttentionLayer,
    CallLayout,
    Geometry,
    ModelAdapter,
    _prompts_for,
    _rows_for,
    flow_noised,
    forward_arguments,
    pack_2x2,
    vae_mode,
)

__all__ = ["QwenImageAdapter"]


class QwenImageAdapter(ModelAdapter):
    family = "qwenimage"
    transformer_classes = ("QwenImageTransformer2DModel",)
    attention_functions = ("diffusers.models.transformers.transformer_qwenimage:dispatch_attention_fn",)

    def layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        return [
            AttentionLayer(f"block.{i}", "joint", block.attn, block, block.attn.heads)
            for i, block in enumerate(transformer.transformer_blocks)
        ]

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        given = forward_arguments(transformer, args, kwargs)
        hidden = given.get("hidden_states")
        text = given.get("encoder_hidden_states")
        mask = given.get("encoder_hidden_states_mask")
        timestep = given.get("timestep")
        img_shapes = given.get("img_shapes")
        n_text, n_image = text.shape[1], hidden.shape[1]
        return CallLayout.concatenated(
            hidden.shape[0],
            float(torch.as_tensor(timestep).flatten()[0].item()) * 1000.0,
            n_text,
            _grid(img_shapes, n_image),
            text_mask=mask.detach().bool().cpu() if mask is not None else None,
        )

    def block_hidden(self, output: Any) -> torch.Tensor:
        encoder_hidden, hidden = output
        return torch.cat([encoder_hidden, hidden], dim=1)

    def text_labels(
        self, pipeline: Any, ids: dict[str, list[torch.Tensor]], prompts: list[str], layout: CallLayout
    ) -> list[Any] | None:
        from ..text import label_tokens

        if not ids.get("text"):
            return None
        tokenizer = pipeline.tokenizer
        rows = _rows_for(ids["text"][0], layout.batch)
        drop = int(getattr(pipeline, "prompt_template_encode_start_idx", 0))
        pad = tokenizer.pad_token_id
        n_text = len(layout.text)
        texts = _prompts_for(prompts, layout.batch)
        labels = []
        for row, prompt in zip(rows.tolist(), texts, strict=True):
            # the pipeline keeps the valid (unpadded) tokens after the template's head, cuts them to
            # max_sequence_length, and pads with zeros up to the longest prompt of the batch
            kept = [i for i in row if i != pad][drop:][:n_text]
            labels.append(label_tokens(tokenizer, kept + [pad] * (n_text - len(kept)), prompt=prompt))
        return labels

    # -- encode and noise: the VAE's mode of one frame, (z − mean) / std, 2 × 2 packing, img_shapes ---------

    max_sequence_length = 1024  # the pipeline's

    def geometry(self, pipeline: Any) -> Geometry:
        return Geometry(pipeline.vae_scale_factor * 2)

    def prompt_inputs(
        self, pipeline: Any, prompt: str, max_sequence_length: int, guidance: float
    ) -> dict[str, Any]:
        embeds, mask = pipeline.encode_prompt(
            prompt, device=pipeline.transformer.device, max_sequence_length=max_sequence_length
        )
        return {
            "encoder_hidden_states": embeds.to(pipeline.transformer.dtype),
            "encoder_hidden_states_mask": mask,
        }

    def encode_pixels(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipeline.vae
        z = vae_mode(vae, pixels[:, :, None])[:, :, 0]  # the video VAE encodes one frame
        view = (1, -1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(view)
        std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(view)
        return (z - mean) / std

    def noised_inputs(
        self, pipeline: Any, latents: torch.Tensor, noise: torch.Tensor, t: float
    ) -> dict[str, Any]:
        device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
        _, _, h, w = latents.shape
        return {
            "hidden_states": pack_2x2(flow_noised(latents, noise, t)).to(device, dtype),
            "img_shapes": [[(1, h // 2, w // 2)]],
            "timestep": torch.full((1,), float(t), device=device, dtype=dtype),
        }


def _grid(img_shapes: Any, n_image: int) -> np.ndarray:
    """``(n_image, 3)`` frame, y, x of the packed latent patches described by ``img_shapes``."""
    shapes = img_shapes
    while isinstance(shapes, list | tuple) and shapes and isinstance(shapes[0], list):
        shapes = shapes[0]  # one sample's list of (frames, h, w)
    if isinstance(shapes, tuple) and len(shapes) == 3 and all(isinstance(v, int) for v in shapes):
        shapes = [shapes]
    cells, first_frame = [], 0
    for f, h, w in shapes or []:
        frame, y, x = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
        cells.append(np.stack([frame.ravel() + first_frame, y.ravel(), x.ravel()], axis=1))
        first_frame += f
    grid = np.concatenate(cells).astype(np.int64) if cells else np.zeros((0, 3), dtype=np.int64)
    if len(grid) != n_image:  # no or inconsistent shapes: a square guess, as the pipeline packs it
        side = max(round(n_image**0.5), 1)
        yx = np.stack(np.divmod(np.arange(n_image), side), axis=1)
        grid = np.concatenate([np.zeros((n_image, 1), dtype=np.int64), yx.astype(np.int64)], axis=1)
    return grid
