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

from torch import nn

from ._video import SelfCrossAttention, VideoTokens, video_grid, video_layout
from .base import AttentionLayer, CallLayout, ModelAdapter, forward_arguments

__all__ = ["WanAdapter"]


class WanAdapter(SelfCrossAttention, VideoTokens, ModelAdapter):
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

    def patch_sizes(self, transformer: nn.Module) -> tuple[int, int]:
        p_t, p_h, _ = transformer.config.patch_size
        return p_h, p_t
