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

from torch import nn

from ._video import BatchedCFG, SelfCrossAttention, VideoTokens, grid_from_coords, video_grid, video_layout
from .base import AttentionLayer, CallLayout, ModelAdapter, forward_arguments

__all__ = ["LTXVideoAdapter"]


class LTXVideoAdapter(BatchedCFG, SelfCrossAttention, VideoTokens, ModelAdapter):
    family = "ltx"
    vae_spatial = ("vae_spatial_compression_ratio", 32)
    vae_temporal = ("vae_temporal_compression_ratio", 8)
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
