"""Find the adapter for a model or pipeline."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UnsupportedModelError, choices
from .base import ModelAdapter
from .chroma import ChromaAdapter
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .generic import GenericAdapter
from .hunyuan import HunyuanVideoAdapter
from .ltx import LTXVideoAdapter
from .mochi import MochiAdapter
from .qwenimage import QwenImageAdapter
from .sd3 import SD3Adapter
from .wan import WanAdapter

__all__ = ["find_adapter", "resolve", "supported_models"]

ADAPTERS: tuple[ModelAdapter, ...] = (
    FluxAdapter(),
    SD3Adapter(),
    Flux2Adapter(),
    QwenImageAdapter(),
    ChromaAdapter(),
    MochiAdapter(),
    CogVideoXAdapter(),
    WanAdapter(),
    HunyuanVideoAdapter(),
    LTXVideoAdapter(),
)


#: tried after every family adapter: any diffusers transformer, positional token labels only
FALLBACK = GenericAdapter()


def supported_models() -> dict[str, tuple[str, ...]]:
    """Supported families and the transformer classes each accepts; ``generic`` (last) describes the fallback.

    >>> supported_models()["flux"]
    ('FluxTransformer2DModel',)
    >>> list(supported_models())[-1]
    'generic'
    """
    return {**{a.family: a.transformer_classes for a in ADAPTERS}, FALLBACK.family: (FALLBACK.description,)}


def resolve(model: Any) -> tuple[ModelAdapter, nn.Module, Any | None]:
    """Split a pipeline or bare transformer into ``(adapter, transformer, pipeline)``.

    >>> resolve(object())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    attnlens.errors.UnsupportedModelError: object is not a supported diffusion transformer or pipeline; \
supported: FluxTransformer2DModel, ...
    """
    transformer = getattr(model, "transformer", None)
    pipeline = model if isinstance(transformer, nn.Module) else None
    transformer = transformer if pipeline is not None else model
    return find_adapter(transformer), transformer, pipeline


def find_adapter(transformer: Any) -> ModelAdapter:
    """The adapter that accepts ``transformer``, or :class:`UnsupportedModelError` listing the choices."""
    if isinstance(transformer, nn.Module):
        for adapter in ADAPTERS:
            if adapter.accepts(transformer):
                return adapter
        if FALLBACK.accepts(transformer):
            return FALLBACK
    known = [c for a in ADAPTERS for c in a.transformer_classes]
    raise UnsupportedModelError(
        f"{type(transformer).__name__} is not a supported diffusion transformer or pipeline; "
        f"supported: {choices(known, limit=40)}, or ({FALLBACK.family}) {FALLBACK.description}"
    )
