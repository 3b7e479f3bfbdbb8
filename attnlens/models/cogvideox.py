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

from ._video import BatchedCFG, VideoTokens, video_grid, video_layout
from .base import AttentionLayer, CallLayout, ModelAdapter, forward_arguments

__all__ = ["CogVideoXAdapter"]


class CogVideoXAdapter(BatchedCFG, VideoTokens, ModelAdapter):
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
