"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): joint attention over ``[image | text]``.

The text half is ``[77 CLIP | T5]``: CLIP-L and CLIP-G hidden states of the same 77 CLIP
tokens, concatenated along channels, then ``max_sequence_length`` T5 tokens (zeros when the
pipeline runs without T5). ``JointAttnProcessor2_0`` calls ``F.scaled_dot_product_attention``
directly with ``(batch, heads, seq, head_dim)`` tensors, so attnlens intercepts SDPA inside
each attention module (a ``TorchFunctionMode``). SD3.5 blocks listed in
``dual_attention_layers`` run a second, image-only self-attention ``attn2`` after the joint
one: its layers are named ``block.N.attn2`` (kind ``self``) and hold NaN for text positions.

The pipeline runs classifier-free guidance as one batch ``[uncond, cond]`` and passes the
scheduler's timestep unchanged; the extra forward of skip-layer guidance (cond rows only,
``skip_layers=``) is labelled branch ``skip_layers`` and its skipped layers hold NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LayoutError
from .base import (
    AttentionLayer,
    CallLayout,
    Geometry,
    ModelAdapter,
    flow_noised,
    forward_arguments,
    scaled_latents,
)

__all__ = ["SD3Adapter"]

#: CLIP's fixed token count in SD3's joint text sequence
CLIP_TOKENS = 77


class SD3Adapter(ModelAdapter):
    family = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    attention_functions = ()
    intercept_sdpa = True

    def layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        found = []
        for i, block in enumerate(transformer.transformer_blocks):
            found.append(AttentionLayer(f"block.{i}", "joint", block.attn, block, block.attn.heads))
            if getattr(block, "attn2", None) is not None:
                found.append(
                    AttentionLayer(f"block.{i}.attn2", "self", block.attn2, block, block.attn2.heads)
                )
        return found

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        given = forward_arguments(transformer, args, kwargs)
        hidden = given.get("hidden_states")
        text = given.get("encoder_hidden_states")
        timestep = given.get("timestep")
        patch = transformer.config.patch_size
        h, w = hidden.shape[-2] // patch, hidden.shape[-1] // patch
        n_image, n_text = h * w, text.shape[1]
        # PatchEmbed flattens (h, w) row-major
        yx = np.stack(np.divmod(np.arange(n_image), w), axis=1)
        grid = np.concatenate([np.zeros((n_image, 1), dtype=np.int64), yx.astype(np.int64)], axis=1)
        return CallLayout.concatenated(
            hidden.shape[0],
            float(torch.as_tensor(timestep).flatten()[0].item()),
            n_text,
            grid,
            text_first=False,
        )

    def call_tokens(
        self, layer: AttentionLayer, layout: CallLayout, n_query: int, n_key: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if layer.kind != "self":
            return None
        if n_query != len(layout.image) or n_key != len(layout.image):
            raise LayoutError(
                f"{layer.name} attends over {n_query} tokens, not the {len(layout.image)} image tokens"
            )
        return layout.image, layout.image

    def branches(
        self, pipeline: Any | None, layout: CallLayout, kwargs: dict[str, Any]
    ) -> tuple[str, ...] | None:
        if kwargs.get("skip_layers") is not None:
            return ("skip_layers",) * layout.batch
        # the pipeline doubles its batch as [negative, positive] only while guidance is on
        if (
            pipeline is None
            or not getattr(pipeline, "do_classifier_free_guidance", False)
            or layout.batch % 2
        ):
            return None
        half = layout.batch // 2
        return ("uncond",) * half + ("cond",) * half

    def block_hidden(self, output: Any) -> torch.Tensor:
        encoder_hidden, hidden = output
        if encoder_hidden is None:  # the last block (context_pre_only) drops the text stream
            return hidden
        return torch.cat([hidden, encoder_hidden], dim=1)

    def text_encoders(self, pipeline: Any) -> list[tuple[str, nn.Module, Any]]:
        # CLIP-G sees the same 77 tokens as CLIP-L (its features are concatenated channel-wise)
        found = [("clip", *pair) for pair in [self.text_encoder(pipeline)] if pair is not None]
        t5, t5_tok = getattr(pipeline, "text_encoder_3", None), getattr(pipeline, "tokenizer_3", None)
        if t5 is not None and t5_tok is not None:
            found.append(("t5", t5, t5_tok))
        return found

    def text_labels(
        self, pipeline: Any, ids: dict[str, list[torch.Tensor]], prompts: list[str], layout: CallLayout
    ) -> list[Any] | None:
        from ..text import TokenLabels, concat_labels, label_tokens
        from .base import _prompts_for, _rows_for

        n_t5 = len(layout.text) - CLIP_TOKENS
        clip_ids = _rows_for(ids["clip"][0], layout.batch) if ids.get("clip") else None
        if clip_ids is None or clip_ids.shape[-1] != CLIP_TOKENS or n_t5 < 0:
            return None
        t5_ids = _rows_for(ids["t5"][0], layout.batch) if ids.get("t5") else None
        if t5_ids is not None and t5_ids.shape[-1] != n_t5:
            return None
        texts = _prompts_for(prompts, layout.batch)
        labels = []
        for row in range(layout.batch):
            clip = label_tokens(pipeline.tokenizer, clip_ids[row].tolist(), prompt=texts[row])
            if t5_ids is not None:
                t5 = label_tokens(pipeline.tokenizer_3, t5_ids[row].tolist(), prompt=texts[row])
            else:  # no T5 encoder: the pipeline feeds zeros, which attend like padding
                t5 = TokenLabels.unknown(n_t5)
                t5.token_kind[:] = "pad"
            labels.append(concat_labels([clip, t5]))
        return labels

    # -- encode and noise: the VAE's mode, (z − shift) · scale, unpacked latents (the transformer patches) --

    max_sequence_length = 256  # the pipeline's T5 length

    def geometry(self, pipeline: Any) -> Geometry:
        return Geometry(pipeline.vae_scale_factor * pipeline.transformer.config.patch_size)

    def token_counts(
        self, pipeline: Any, *, height: int, width: int, frames: int = 1, text: int
    ) -> tuple[int, int]:
        _, image = super().token_counts(pipeline, height=height, width=width, frames=frames, text=text)
        return CLIP_TOKENS + text, image  # text: the T5 tokens, after CLIP's 77

    def prompt_inputs(
        self, pipeline: Any, prompt: str, max_sequence_length: int, guidance: float
    ) -> dict[str, Any]:
        dtype = pipeline.transformer.dtype
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt,
            prompt_2=prompt,
            prompt_3=prompt,
            device=pipeline.transformer.device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype)}

    def encode_pixels(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        return scaled_latents(pipeline.vae, pixels)

    def noised_inputs(
        self, pipeline: Any, latents: torch.Tensor, noise: torch.Tensor, t: float
    ) -> dict[str, Any]:
        device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
        return {
            "hidden_states": flow_noised(latents, noise, t).to(device, dtype),
            "timestep": torch.full(
                (1,), float(t) * 1000, device=device, dtype=dtype
            ),  # the scheduler's value
        }
