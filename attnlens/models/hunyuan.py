"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): joint attention over ``[video | text]``.

Dual-stream blocks (``double.N``) project video and text separately and attend jointly;
single-stream blocks (``single.N``) see the concatenated sequence. Both call
``dispatch_attention_fn`` with post-norm ``(batch, seq, heads, head_dim)`` tensors, RoPE on
the video part only, and a key mask ``(batch, 1, 1, seq)`` that hides each sample's padded
text (masked keys get probability 0; padded text queries keep their rows). The token-replace
image-to-video variant has the same layout.

Video tokens are ``patch_size_t × patch_size × patch_size`` patches of the latent,
frame-major. Text comes from the Llama encoder; the pipeline crops the prompt template's
first ``crop_start`` tokens, so the text positions are the last ``max_sequence_length``
token ids the encoder saw. Timesteps are the scheduler's (flow matching, 1000 → 0); CFG runs
as two forwards under ``cache_context("cond")`` / ``("uncond")``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._video import video_grid, video_layout
from .base import (
    AttentionLayer,
    CallLayout,
    Geometry,
    ModelAdapter,
    _prompts_for,
    _rows_for,
    flow_noised,
    forward_arguments,
    scaled_latents,
    stream_layers,
)

__all__ = ["HunyuanVideoAdapter"]


class HunyuanVideoAdapter(ModelAdapter):
    family = "hunyuanvideo"
    # the default text_encoder/tokenizer: the Llama tokens enter attention; CLIP (text_encoder_2) gives
    # the pooled vector only
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    attention_functions = ("diffusers.models.transformers.transformer_hunyuan_video:dispatch_attention_fn",)

    def layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        return stream_layers(transformer)

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        given = forward_arguments(transformer, args, kwargs)
        mask = given.get("encoder_attention_mask")
        cfg = transformer.config
        _, _, frames, height, width = given["hidden_states"].shape
        grid = video_grid(frames // cfg.patch_size_t, height // cfg.patch_size, width // cfg.patch_size)
        return video_layout(
            given,
            grid,
            text_first=False,
            text_mask=mask.detach().bool().cpu() if mask is not None else None,
        )

    def block_hidden(self, output: Any) -> torch.Tensor:
        hidden, encoder_hidden = output
        return torch.cat([hidden, encoder_hidden], dim=1)

    def text_labels(
        self, pipeline: Any, ids: dict[str, list[torch.Tensor]], prompts: list[str], layout: CallLayout
    ) -> list[Any] | None:
        from ..text import label_tokens

        encoders = self.text_encoders(pipeline)
        if not encoders or not ids.get(encoders[0][0]):
            return None
        source, _, tokenizer = encoders[0]
        rows = _rows_for(ids[source][0], layout.batch)
        n_text = len(layout.text)
        if rows is None or rows.shape[-1] < n_text:
            return None
        rows = rows[:, rows.shape[-1] - n_text :]  # the template's first crop_start tokens are dropped
        texts = _prompts_for(prompts, layout.batch)
        return [
            label_tokens(tokenizer, row.tolist(), prompt=text) for row, text in zip(rows, texts, strict=True)
        ]

    # -- encode and noise: latents z · scaling_factor, flow noise, timestep and guidance × 1000 --

    max_sequence_length = 256

    def geometry(self, pipeline: Any) -> Geometry:
        cfg = pipeline.transformer.config
        spatial, temporal = pipeline.vae_scale_factor_spatial, pipeline.vae_scale_factor_temporal
        return Geometry(spatial * cfg.patch_size, temporal, cfg.patch_size_t, 480)

    def prompt_inputs(
        self, pipeline: Any, prompt: str, max_sequence_length: int, guidance: float
    ) -> dict[str, Any]:
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        template = DEFAULT_PROMPT_TEMPLATE["template"]
        # the template's head, cropped away after encoding, counted with this pipeline's own tokenizer
        crop = len(pipeline.tokenizer(template.split("{}")[0])["input_ids"])
        device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
        embeds, pooled, mask = pipeline.encode_prompt(
            prompt,
            prompt_2=prompt,
            prompt_template={"template": template, "crop_start": crop},
            device=device,
            max_sequence_length=max_sequence_length,
        )
        inputs = {
            "encoder_hidden_states": embeds.to(dtype),
            "encoder_attention_mask": mask,
            "pooled_projections": pooled.to(dtype),
        }
        if pipeline.transformer.config.guidance_embeds:
            inputs["guidance"] = torch.full((1,), float(guidance) * 1000.0, device=device, dtype=dtype)
        return inputs

    def encode_pixels(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        return scaled_latents(pipeline.vae, pixels)

    def noised_inputs(
        self, pipeline: Any, latents: torch.Tensor, noise: torch.Tensor, t: float
    ) -> dict[str, Any]:
        device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
        return {
            "hidden_states": flow_noised(latents, noise, t).to(device, dtype),
            "timestep": torch.full((1,), float(t) * 1000.0, device=device, dtype=dtype),
        }
