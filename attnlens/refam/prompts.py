"""RefAM prompts: the expression (optionally inside a caption), then appended attention magnets.

Appended stop words split the background's attention into small clusters that the magnets
absorb (REFAM.md, "redistribution"); one colour word joins them. The magnets are labelled
``magnet`` (:func:`attnlens.text.append_magnets`), so that GAS redirection can move mass onto
them and aggregation can leave them out.

>>> from attnlens.testing import tiny_t5_tokenizer
>>> p = build_prompt("the red mug on the left", tiny_t5_tokenizer(), max_length=16)
>>> p.text
'the red mug on the left the of and white'
>>> [p.labels.token_str[i] for i in p.target], [p.labels.token_str[i] for i in p.magnet]
(['▁mug'], ['▁the', '▁of', '▁and', '▁white'])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..text import TokenLabels, append_magnets, label_prompt
from .errors import RefamError
from .parse import SPATIAL_WORDS, ParsedExpression, parse

__all__ = [
    "DEFAULT_COLOUR",
    "DEFAULT_MAGNETS",
    "TARGET_CHOICES",
    "RefamPrompt",
    "build_prompt",
    "compose",
]

#: appended stop words: common ones that every tokenizer of attnlens' models (T5, ShapesRef) knows
DEFAULT_MAGNETS: tuple[str, ...] = ("the", "of", "and")
#: the colour magnet; when the expression names it, the first of :data:`_SPARE_COLOURS` it does not
DEFAULT_COLOUR = "white"
_SPARE_COLOURS = ("white", "black", "grey", "blue", "green")
TARGET_CHOICES = ("head", "phrase")


@dataclass(frozen=True)
class RefamPrompt:
    """A tokenized RefAM prompt and the roles of its text positions.

    Attributes:
        text: the prompt string.
        expression_span: ``[start, end)`` of the expression in ``text``.
        magnet_start: where the appended magnets begin in ``text`` (``None``: none appended).
        magnets: the appended magnet words.
        target_words: the words whose maps are aggregated.
        input_ids: ``(key_text,)`` token ids, padded as the model's encoder pads.
        labels: their :class:`~attnlens.TokenLabels`.
        target: text positions (into ``input_ids``) of the target words inside the expression.
        magnet: text positions of the appended magnets.
    """

    text: str
    expression_span: tuple[int, int]
    magnet_start: int | None
    magnets: tuple[str, ...]
    target_words: tuple[str, ...]
    input_ids: list[int]
    labels: TokenLabels
    target: np.ndarray
    magnet: np.ndarray


def compose(
    expression: str,
    *,
    caption: str | None = None,
    magnets: Sequence[str] = DEFAULT_MAGNETS,
    colour: str | None = DEFAULT_COLOUR,
) -> tuple[str, tuple[int, int], int | None, tuple[str, ...]]:
    """The prompt string: ``caption`` around the expression, then the magnets.

    A caption holding ``{expression}`` gets the expression there; any other caption is followed
    by ``", "`` and the expression. ``colour`` is replaced by a spare colour when the expression
    already names it (a magnet must not be a target word).

    Returns:
        ``(prompt, expression_span, magnet_start, magnets)``; ``magnet_start`` is ``None`` when
        nothing is appended.

    >>> compose("the white cat", magnets=["the"], caption="a photo of {expression}")
    ('a photo of the white cat the black', (11, 24), 25, ('the', 'black'))
    """
    expression = expression.strip()
    if caption is None:
        text, start = expression, 0
    elif "{expression}" in caption:
        start = caption.index("{expression}")
        text = caption.replace("{expression}", expression, 1)
    else:
        start = len(caption) + 2
        text = f"{caption}, {expression}"
    span = (start, start + len(expression))
    words = set(expression.lower().split())
    chosen = [str(m) for m in magnets]
    if colour is not None:
        if colour.lower() in words:
            colour = next((c for c in _SPARE_COLOURS if c not in words), None)
        if colour is not None:
            chosen.append(colour)
    if not chosen:
        return text, span, None, ()
    text, magnet_start = append_magnets(text, chosen)
    return text, span, magnet_start, tuple(chosen)


def build_prompt(
    expression: str | ParsedExpression,
    tokenizer: Any,
    *,
    max_length: int,
    caption: str | None = None,
    magnets: Sequence[str] = DEFAULT_MAGNETS,
    colour: str | None = DEFAULT_COLOUR,
    append: bool = True,
    targets: str = "head",
    parser: str = "auto",
) -> RefamPrompt:
    """Compose, tokenize and label a RefAM prompt.

    Args:
        expression: the referring expression, or its :func:`~attnlens.refam.parse` result.
        tokenizer: the tokenizer of the model's text encoder, or a function ``prompt → (input ids,
            TokenLabels)`` that encodes the prompt as a pipeline does (an adapter's
            :meth:`~attnlens.models.base.ModelAdapter.encode_prompt`): its tokens from the
            magnets' first character on are labelled ``magnet``.
        max_length: the encoder's sequence length; the ids are padded to it.
        caption: see :func:`compose`.
        magnets: appended stop words (default :data:`DEFAULT_MAGNETS`).
        colour: appended colour word (default :data:`DEFAULT_COLOUR`; ``None`` for none).
        append: ``False`` appends no magnet at all (the "no appended magnets" ablation).
        targets: ``"head"`` (the head noun) or ``"phrase"`` (the content words of the target
            noun phrase, spatial words excluded).
        parser: see :func:`~attnlens.refam.parse`.

    Raises:
        RefamError: no target token survived tokenization (the prompt was cut short).
    """
    if targets not in TARGET_CHOICES:
        raise ValueError(f"unknown targets {targets!r}: use one of {', '.join(TARGET_CHOICES)}")
    parsed = expression if isinstance(expression, ParsedExpression) else parse(expression, parser=parser)
    text, span, magnet_start, appended = compose(
        parsed.text, caption=caption, magnets=magnets if append else (), colour=colour if append else None
    )
    if callable(tokenizer) and not hasattr(tokenizer, "convert_ids_to_tokens"):
        ids, labels = tokenizer(text)
        labels = _with_magnets(labels, magnet_start)
    else:
        ids, labels = label_prompt(tokenizer, text, max_length=max_length, magnet_start=magnet_start)
    words = (parsed.head,) if targets == "head" else tuple(w for w in parsed.phrase if w not in SPATIAL_WORDS)
    starts = labels.char_start if labels.char_start is not None else np.full(len(labels), -1)
    inside = (starts >= span[0]) & (starts < span[1])
    lowered = np.array([str(w).lower() for w in labels.word], dtype=object)
    target = np.flatnonzero(inside & np.isin(lowered, list(words)))
    if not len(target):
        raise RefamError(
            f"none of the target words {list(words)} is among the {len(ids)} tokens the encoder sees of "
            f"{text!r}: shorten the caption or raise max_length"
        )
    magnet = np.flatnonzero(labels.token_kind == "magnet")
    return RefamPrompt(text, span, magnet_start, appended, words, ids, labels, target, magnet)


def _with_magnets(labels: TokenLabels, magnet_start: int | None) -> TokenLabels:
    """``labels`` with the tokens of the words from character ``magnet_start`` on labelled ``magnet``."""
    if magnet_start is None or labels.char_start is None:
        return labels
    appended = (labels.char_start >= magnet_start) & (labels.word_index >= 0)
    kinds = np.where(appended, "magnet", labels.token_kind).astype(object)
    return dataclasses.replace(labels, token_kind=kinds)
