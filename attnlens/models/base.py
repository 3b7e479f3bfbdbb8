"""What a model adapter tells attnlens about one architecture family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

__all__ = ["AttentionLayer", "CallLayout", "ModelAdapter"]


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer: a stable name and the modules that bracket its computation.

    Attributes:
        name: stable name, e.g. ``"double.3"``.
        kind: layer family within the model, e.g. ``"double"`` or ``"single"``.
        module: the attention module; its forward encloses the intercepted attention call.
        block: the transformer block whose output holds this layer's hidden states.
        num_heads: heads of this layer (global count).
    """

    name: str
    kind: str
    module: nn.Module
    block: nn.Module
    num_heads: int


@dataclass(frozen=True)
class CallLayout:
    """Token layout of one transformer forward.

    Attributes:
        batch: rows in the forward's batch.
        timestep: the scheduler's timestep value of this forward.
        seq_len: length of the joint sequence seen by attention.
        text: positions of text tokens in the joint sequence, ``(key_text,)``.
        image: positions of image/video tokens, ``(query,)``.
        grid: ``(query, 3)`` integer array: ``frame, y, x`` of each image/video token.
    """

    batch: int
    timestep: float
    seq_len: int
    text: torch.Tensor
    image: torch.Tensor
    grid: np.ndarray

    def same_tokens(self, other: CallLayout) -> bool:
        """Whether two calls share token counts and image grid."""
        return (
            self.seq_len == other.seq_len
            and len(self.text) == len(other.text)
            and np.array_equal(self.grid, other.grid)
        )


class ModelAdapter:
    """Everything attnlens knows about one family of diffusion transformers.

    Subclasses name the transformer classes they accept, the module-level attention
    functions through which post-RoPE ``q``/``k`` pass, their layers, and the token layout
    of each call. Nothing outside an adapter knows an architecture's token order.
    """

    family: ClassVar[str]
    #: class names of the transformers this adapter accepts
    transformer_classes: ClassVar[tuple[str, ...]]
    #: ``"module:function"`` names of the attention functions to intercept
    attention_functions: ClassVar[tuple[str, ...]]
    #: arguments of the intercepted function: positions of query, key, attn_mask, scale
    attention_arguments: ClassVar[dict[str, int]] = {"query": 0, "key": 1, "attn_mask": 3, "scale": 6}

    def accepts(self, transformer: nn.Module) -> bool:
        return any(cls.__name__ in self.transformer_classes for cls in type(transformer).__mro__)

    def layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        """Attention layers in execution order."""
        raise NotImplementedError

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        """Token layout of a forward called with ``args`` / ``kwargs``."""
        raise NotImplementedError

    def block_hidden(self, output: Any) -> torch.Tensor:
        """The joint ``(batch, seq, dim)`` hidden state of a block's output."""
        raise NotImplementedError

    def text_encoder(self, pipeline: Any) -> tuple[nn.Module, Any] | None:
        """The text encoder whose tokens enter joint attention, and its tokenizer."""
        return None
