"""Model adapters: one per architecture family, each the only place that knows its token order."""

from .base import AttentionLayer, CallLayout, ModelAdapter
from .registry import find_adapter, resolve, supported_models

__all__ = ["AttentionLayer", "CallLayout", "ModelAdapter", "find_adapter", "resolve", "supported_models"]
