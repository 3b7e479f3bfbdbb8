"""FLUX.2 (``Flux2Transformer2DModel``): joint attention over ``[text | image]``.

Like FLUX.1, double-stream blocks (``double.N``) attend jointly over separately projected text
and image tokens and single-stream blocks (``single.N``, a fused QKV+MLP projection) over the
concatenated sequence; both call ``dispatch_attention_fn`` with post-norm, post-RoPE
``(batch, seq, heads, head_dim)`` tensors. Position ids have four axes ``(t, h, w, l)``:
reference images of FLUX.2's editing mode are appended after the generated image's tokens with
``t = 10, 20, …``; attnlens numbers them as frames ``1, 2, …`` (frame 0 is the generated image).
The pipelines pass ``timestep / 1000``. The text sequence is the whole chat-template prompt
the text encoder (Mistral-3 for FLUX.2 [dev], Qwen-3 for [klein]) saw: tokens of the template
around the user's prompt are labelled ``special``. ``[klein]`` runs guidance as two calls under
``cache_context("cond"/"uncond")``. The KV-cache mode of ``Flux2KleinKVPipeline`` (reference
keys injected between text and image) is refused with a clear error.
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
    stream_layers,
)

__all__ = ["Flux2Adapter"]


class Flux2Adapter(ModelAdapter):
    family = "flux2"
    transformer_classes = ("Flux2Transformer2DModel",)
    attention_functions = ("diffusers.models.transformers.transformer_flux2:dispatch_attention_fn",)

    def layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        return stream_layers(transformer)

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        given = forward_arguments(transformer, args, kwargs)
        hidden = given.get("hidden_states")
        text = given.get("encoder_hidden_states")
        timestep = given.get("timestep")
        img_ids = given.get("img_ids")
        if kwargs.get("kv_cache_mode") is not None:
            raise UnsupportedModelError(
                "attnlens cannot capture FLUX.2's KV-cache mode (kv_cache_mode="
                f"{kwargs['kv_cache_mode']!r}): its reference keys are not part of the call's sequence; "
                "run the pipeline without the KV cache (Flux2KleinPipeline) to capture"
            )
        n_text, n_image = text.shape[1], hidden.shape[1]
        grid = _grid(img_ids, n_image)
        return CallLayout.concatenated(
            hidden.shape[0],
            float(torch.as_tensor(timestep).flatten()[0].item()) * 1000.0,
            n_text,
            grid,
        )

    def block_hidden(self, output: Any) -> torch.Tensor:
        if isinstance(output, torch.Tensor):  # single-stream: already [text | image]
            return output
        encoder_hidden, hidden = output
        return torch.cat([encoder_hidden, hidden], dim=1)

    def text_encoder(self, pipeline: Any) -> tuple[nn.Module, Any] | None:
        encoder, tokenizer = getattr(pipeline, "text_encoder", None), getattr(pipeline, "tokenizer", None)
        if encoder is None or tokenizer is None:
            return None
        # FLUX.2 [dev] holds a Pixtral processor; its tokenizer is what turns ids into tokens
        return encoder, getattr(tokenizer, "tokenizer", tokenizer)

    # -- encode and noise, with the pipeline's public prepare_image_latents and prepare_latents ------------

    def geometry(self, pipeline: Any) -> Geometry:
        return Geometry(pipeline.vae_scale_factor * 2)

    def prompt_inputs(
        self, pipeline: Any, prompt: str, max_sequence_length: int, guidance: float
    ) -> dict[str, Any]:
        device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
        embeds, text_ids = pipeline.encode_prompt(
            prompt, device=device, max_sequence_length=max_sequence_length, **_hidden_layers(pipeline)
        )
        inputs = {"encoder_hidden_states": embeds.to(dtype), "txt_ids": text_ids}
        if pipeline.transformer.config.guidance_embeds:
            inputs["guidance"] = torch.full((1,), float(guidance), device=device)
        return inputs

    def encode_pixels(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        """The latents of FLUX.2's 2 × 2-patchified, batch-normalised space, ``(1, 4C, h/2, w/2)``."""
        dtype = pipeline.transformer.dtype
        packed, _ = pipeline.prepare_image_latents([pixels], 1, None, pipeline.transformer.device, dtype)
        h, w = (side // (pipeline.vae_scale_factor * 2) for side in pixels.shape[-2:])
        return packed.permute(0, 2, 1).reshape(1, packed.shape[-1], h, w)  # tokens are row-major

    def noised_inputs(
        self, pipeline: Any, latents: torch.Tensor, noise: torch.Tensor, t: float
    ) -> dict[str, Any]:
        device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
        _, channels, h, w = latents.shape
        side = pipeline.vae_scale_factor * 2
        x_t = flow_noised(latents, noise, t)
        hidden, ids = pipeline.prepare_latents(
            1, channels // 4, h * side, w * side, dtype, device, None, latents=x_t
        )
        return {
            "hidden_states": hidden,
            "img_ids": ids,
            "timestep": torch.full((1,), float(t), device=device, dtype=dtype),
        }


def _grid(img_ids: torch.Tensor | None, n_image: int) -> np.ndarray:
    """``(n_image, 3)`` frame, y, x from ``(t, h, w, l)`` position ids; frame = rank of ``t``."""
    if img_ids is None:
        side = max(round(n_image**0.5), 1)
        yx = np.stack(np.divmod(np.arange(n_image), side), axis=1)
        return np.concatenate([np.zeros((n_image, 1), dtype=np.int64), yx.astype(np.int64)], axis=1)
    ids = (img_ids[0] if img_ids.ndim == 3 else img_ids).round().long().cpu().numpy()
    frame = np.unique(ids[:, 0], return_inverse=True)[1].reshape(-1)
    return np.stack([frame, ids[:, 1], ids[:, 2]], axis=1).astype(np.int64)


def _hidden_layers(pipeline: Any) -> dict[str, Any]:
    """The text encoder's hidden layers FLUX.2 stacks: the pipeline's default, or the last ones of an
    encoder too shallow for it (a scaled-down model)."""
    import inspect

    default = inspect.signature(pipeline.encode_prompt).parameters.get("text_encoder_out_layers")
    depth = getattr(getattr(pipeline.text_encoder, "config", None), "num_hidden_layers", None)
    if default is None or not isinstance(depth, int) or max(default.default) <= depth:
        return {}
    n = len(default.default)
    return {"text_encoder_out_layers": tuple(range(max(0, depth + 1 - n), depth + 1))}
