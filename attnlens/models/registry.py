"""Find the adapter for a model or pipeline."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UnsupportedModelError, choices
from .base import ModelAdapter
from .flux import FluxAdapter

__all__ = ["find_adapter", "resolve", "supported_models"]

ADAPTERS: tuple[ModelAdapter, ...] = (FluxAdapter(),)


def supported_models() -> dict[str, tuple[str, ...]]:
    """Supported families and the transformer classes each accepts.

    >>> supported_models()["flux"]
    ('FluxTransformer2DModel',)
    """
    return {a.family: a.transformer_classes for a in ADAPTERS}


def resolve(model: Any) -> tuple[ModelAdapter, nn.Module, Any | None]:
    """Split a pipeline or bare transformer into ``(adapter, transformer, pipeline)``.

    >>> resolve(object())
    Traceback (most recent call last):
    ...
    attnlens.errors.UnsupportedModelError: object is not a supported diffusion transformer or pipeline; \
supported: FluxTransformer2DModel
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
    known = [c for a in ADAPTERS for c in a.transformer_classes]
    raise UnsupportedModelError(
        f"{type(transformer).__name__} is not a supported diffusion transformer or pipeline; "
        f"supported: {choices(known)}"
    )
