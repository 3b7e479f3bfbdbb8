"""A positional fallback for any other diffusers transformer: maps on day one, no word alignment.

For a ``ModelMixin`` that no family adapter accepts, attnlens captures every attention module
(diffusers' ``Attention`` or an ``AttentionModuleMixin``) by its qualified module name, e.g.
``transformer_blocks.0.attn1``, intercepting ``dispatch_attention_fn`` where the module's
processor looks it up, and ``F.scaled_dot_product_attention`` inside the module (a
``TorchFunctionMode``, as diffusers' ``hooks/layer_skip.py`` does).

What it cannot know, it guesses, and says so in the Dataset's attributes
(``generic_adapter=True``, ``token_layout``) and in a :class:`GenericAdapterWarning`:

- the joint sequence of the Dataset is ``[text | image]``, with ``encoder_hidden_states``'
  length as text and the patch count of ``hidden_states`` (``config.patch_size``,
  ``patch_size_t``) as image tokens;
- a call over ``text + image`` tokens is taken to be in that order (FLUX, Chroma, Qwen-Image,
  CogVideoX, HunyuanVideo, Lumina all concatenate text first); a call over the image tokens
  only is image self-attention, one with image queries and text keys cross-attention; calls
  of any other shape are skipped (NaN) with a warning;
- text tokens carry positions only (kind ``text``, or ``pad`` where an
  ``encoder_attention_mask`` masks them): the text encoder is not known;
- the image grid is row-major over the latent's ``(frames, h, w)``; tokens that arrive already
  packed ``(batch, n, channels)`` are taken as a square grid when ``n`` is a square, else a row;
- the timestep is recorded as passed to the transformer (pipelines differ in its scale);
- ``hidden_norm`` is refused: block outputs have no known layout.
"""

from __future__ import annotations

import importlib
import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import AttentionLayer, CallLayout, ModelAdapter

__all__ = ["GenericAdapter", "GenericAdapterWarning"]

TOKEN_LAYOUT = (
    "positional: text positions first, then image tokens (row-major over the latent grid); "
    "joint attention calls assumed [text | image]; no word alignment"
)


class GenericAdapterWarning(UserWarning):
    """A model is captured with the positional fallback, or one of its calls could not be placed."""


class GenericAdapter(ModelAdapter):
    family = "generic"
    #: no class names: accepts any diffusers ``ModelMixin`` with attention modules
    transformer_classes = ()
    attention_functions = ()
    intercept_sdpa = True
    unsupported_keeps = ("hidden_norm",)
    description = "any other diffusers transformer whose attention calls dispatch_attention_fn or SDPA"

    def accepts(self, transformer: nn.Module) -> bool:
        from diffusers.models.modeling_utils import ModelMixin

        return isinstance(transformer, ModelMixin) and bool(_attention_modules(transformer))

    def interceptions(self, transformer: nn.Module) -> tuple[str, ...]:
        # patch dispatch_attention_fn where each processor looks it up (non-native backends skip SDPA)
        modules = {type(m).__module__ for _, m in _attention_modules(transformer)}
        modules |= {
            type(getattr(m, "processor", None)).__module__ for _, m in _attention_modules(transformer)
        }
        targets = []
        for name in sorted(modules):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if callable(getattr(module, "dispatch_attention_fn", None)):
                targets.append(f"{name}:dispatch_attention_fn")
        return tuple(targets)

    def layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        warnings.warn(
            f"{type(transformer).__name__} has no attnlens adapter: capturing it with the generic fallback "
            "(positional token labels, no word alignment, guessed token order); see "
            "attnlens.supported_models()",
            GenericAdapterWarning,
            stacklevel=4,
        )
        found = []
        for name, module in _attention_modules(transformer):
            heads = int(getattr(module, "heads", 0) or getattr(module, "num_heads", 0) or 1)
            found.append(AttentionLayer(name, name.rsplit(".", 1)[-1], module, module, heads))
        return found

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"{type(transformer).__name__} was called without a hidden_states tensor")
        text = kwargs.get("encoder_hidden_states")
        n_text = text.shape[1] if isinstance(text, torch.Tensor) and text.ndim == 3 else 0
        grid = _grid(hidden, transformer.config)
        timestep = kwargs.get("timestep", kwargs.get("t"))
        t = float(torch.as_tensor(timestep).flatten()[0].item()) if timestep is not None else 0.0
        mask = kwargs.get("encoder_attention_mask", kwargs.get("encoder_hidden_states_mask"))
        text_mask = None
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape == (hidden.shape[0], n_text):
            text_mask = (mask > 0).detach().cpu() if mask.dtype != torch.bool else mask.detach().cpu()
        return CallLayout.concatenated(
            hidden.shape[0],
            t,
            n_text,
            grid,
            text_mask=text_mask,
        )

    def call_tokens(
        self, layer: AttentionLayer, layout: CallLayout, n_query: int, n_key: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        text, image = layout.text, layout.image
        n_text, n_image = len(text), len(image)
        if n_text and n_query == n_key == n_text + n_image:
            return None  # joint, assumed [text | image]
        for q, k in ((image, image), (image, text), (text, image), (text, text)):
            if len(q) and len(k) and (n_query, n_key) == (len(q), len(k)):
                return q, k
        warnings.warn(
            f"{layer.name}: a call with {n_query} queries and {n_key} keys matches neither the "
            f"{n_image} image tokens nor the {n_text} text tokens; it is not captured (NaN)",
            GenericAdapterWarning,
            stacklevel=2,
        )
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty

    def block_hidden(self, output: Any) -> torch.Tensor:
        raise NotImplementedError("the generic adapter does not know the layout of block outputs")

    def dataset_attrs(self, transformer: nn.Module) -> dict[str, Any]:
        return {
            "generic_adapter": True,
            "token_layout": TOKEN_LAYOUT,
            "timestep_scale": "as passed to the transformer",
        }


def _attention_modules(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules in registration order, outermost only (no attention inside another)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    found: list[tuple[str, nn.Module]] = []
    for name, module in transformer.named_modules():
        if not isinstance(module, Attention | AttentionModuleMixin):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    return found


def _grid(hidden: torch.Tensor, config: Any) -> np.ndarray:
    """``(n_image, 3)`` frame, y, x of the image tokens a ``hidden_states`` tensor becomes."""
    patch = getattr(config, "patch_size", None) or 1
    patch = patch[-1] if isinstance(patch, list | tuple) else patch
    patch_t = getattr(config, "patch_size_t", None) or 1
    if hidden.ndim == 5:  # (batch, channels, frames, h, w)
        f, h, w = hidden.shape[2] // patch_t, hidden.shape[3] // patch, hidden.shape[4] // patch
    elif hidden.ndim == 4:  # (batch, channels, h, w)
        f, h, w = 1, hidden.shape[2] // patch, hidden.shape[3] // patch
    else:  # already packed (batch, n, channels): a square if it can be one
        n = hidden.shape[1]
        side = math.isqrt(n)
        f, h, w = (1, side, side) if side * side == n else (1, 1, n)
    frame, y, x = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([frame.ravel(), y.ravel(), x.ravel()], axis=1).astype(np.int64)
