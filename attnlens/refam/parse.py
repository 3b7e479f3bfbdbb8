"""Referring-expression parsing: the target noun phrase, its head noun, and spatial words.

Two parsers share one result, :class:`ParsedExpression`:

- ``"rules"`` (always available): the expression is cut at the first relation word
  (prepositions such as ``on``/``with``/``next``, relative pronouns such as ``that``); the target
  phrase is the first piece holding a noun, where a noun is any word that is neither a stop word
  nor a modifier (colour, size, spatial, number or ordinal word). The head noun is its last noun.
- ``"spacy"`` (the ``nlp`` extra with ``en_core_web_sm`` installed): the first noun chunk whose
  root is a noun; the root is the head noun.

``parser="auto"`` uses spaCy when it and its English model load, the rules otherwise. Spatial
words are found over the whole expression by both, with the same table, :data:`SPATIAL_WORDS`.

>>> p = parse("The small red mug on the left", parser="rules")
>>> p.phrase, p.head, p.spatial, p.directions
(('small', 'red', 'mug'), 'mug', ('left',), ('left',))
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from ..text import is_stop_word
from .errors import EmptyExpressionError, NoNounError

__all__ = ["COLOUR_WORDS", "PARSERS", "SPATIAL_WORDS", "ParsedExpression", "parse"]

PARSERS = ("auto", "rules", "spacy")

#: spatial word -> direction of the soft prior (``near``/``far`` are depth cues: recorded, no prior)
SPATIAL_WORDS: dict[str, str] = {
    "left": "left",
    "leftmost": "left",
    "right": "right",
    "rightmost": "right",
    "top": "top",
    "upper": "top",
    "topmost": "top",
    "bottom": "bottom",
    "lower": "bottom",
    "bottommost": "bottom",
    "middle": "middle",
    "center": "middle",
    "centre": "middle",
    "central": "middle",
    "closest": "near",
    "nearest": "near",
    "front": "near",
    "farthest": "far",
    "furthest": "far",
    "back": "far",
}

COLOUR_WORDS = frozenset(
    "red green blue yellow purple orange pink brown black white grey gray beige tan gold silver "
    "violet cyan magenta teal navy maroon dark light pale bright".split()
)
_SIZE_WORDS = frozenset("small large big little tiny huge tall short long wide narrow thin fat giant".split())
_NUMBER_WORDS = frozenset(
    "one two three four five six seven eight nine ten first second third fourth fifth last other another "
    "single both".split()
)
# words that end the target noun phrase: prepositions, relative pronouns and common relation verbs
_RELATIONS = frozenset(
    "on in at with near next behind under over above below beside besides by to from that which who whose "
    "where between inside outside of against along across around holding wearing sitting standing "
    "lying riding carrying facing".split()
)
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


@dataclass(frozen=True)
class ParsedExpression:
    """What the pipeline needs from a referring expression (all words lower case).

    Attributes:
        text: the expression as given.
        phrase: content words of the target noun phrase (determiners and stop words removed),
            e.g. ``("small", "red", "mug")``.
        head: the head noun of that phrase.
        spatial: spatial words of the whole expression, as written.
        directions: their directions (``left``, ``right``, ``top``, ``bottom``, ``middle``,
            ``near``, ``far``), one per spatial word.
        parser: ``"rules"`` or ``"spacy"``.
    """

    text: str
    phrase: tuple[str, ...]
    head: str
    spatial: tuple[str, ...]
    directions: tuple[str, ...]
    parser: str

    @property
    def modifiers(self) -> tuple[str, ...]:
        """Words of the phrase other than the head noun and spatial words."""
        return tuple(w for w in self.phrase if w != self.head and w not in SPATIAL_WORDS)


def _is_modifier(word: str) -> bool:
    return word in SPATIAL_WORDS or word in COLOUR_WORDS or word in _SIZE_WORDS or word in _NUMBER_WORDS


def _is_noun(word: str) -> bool:
    return not (is_stop_word(word) or _is_modifier(word) or word.isdigit())


def _words(expression: Any) -> list[str]:
    if not isinstance(expression, str):
        raise EmptyExpressionError(
            f"a referring expression is a string such as 'the red mug'; got {type(expression).__name__}"
        )
    words = [w.lower().replace("’", "'") for w in _WORD.findall(expression)]
    if not words:
        raise EmptyExpressionError(
            f"the referring expression {expression!r} holds no word: name the object, e.g. 'the red mug'"
        )
    return words


def _spatial(words: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    found = tuple(w for w in words if w in SPATIAL_WORDS)
    return found, tuple(SPATIAL_WORDS[w] for w in found)


def _parse_rules(expression: str, words: list[str]) -> ParsedExpression:
    pieces: list[list[str]] = [[]]
    for w in words:
        if w in _RELATIONS:
            pieces.append([])
        else:
            pieces[-1].append(w)
    for piece in pieces:
        nouns = [i for i, w in enumerate(piece) if _is_noun(w)]
        if not nouns:
            continue
        last = nouns[-1]
        phrase = tuple(w for w in piece[: last + 1] if not is_stop_word(w) or _is_modifier(w))
        spatial, directions = _spatial(words)
        return ParsedExpression(expression, phrase, piece[last], spatial, directions, "rules")
    raise NoNounError(
        f"no noun found in {expression!r} (rule-based parser: every word is a stop word, colour, size, "
        "number or spatial word); name the object, e.g. 'the red mug on the left'"
    )


@functools.cache
def _spacy_model() -> Any:
    """spaCy's small English pipeline, or ``None`` where spaCy or the model is missing."""
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except (ImportError, OSError):
        return None


def _parse_spacy(nlp: Any, expression: str, words: list[str]) -> ParsedExpression:
    doc = nlp(expression)
    for chunk in doc.noun_chunks:
        root = chunk.root
        if root.pos_ not in ("NOUN", "PROPN") or root.text.lower() in SPATIAL_WORDS:
            continue
        phrase = tuple(
            t.text.lower()
            for t in chunk
            if t.pos_ not in ("DET", "PRON", "PUNCT") and (not t.is_stop or _is_modifier(t.text.lower()))
        )
        spatial, directions = _spatial(words)
        return ParsedExpression(expression, phrase, root.text.lower(), spatial, directions, "spacy")
    raise NoNounError(
        f"no noun found in {expression!r} (spaCy found no noun chunk); name the object, "
        "e.g. 'the red mug on the left'"
    )


def parse(expression: str, *, parser: str = "auto") -> ParsedExpression:
    """Parse a referring expression.

    Args:
        expression: e.g. ``"the small red mug on the left"``.
        parser: ``"auto"`` (spaCy when ``en_core_web_sm`` loads, else rules), ``"rules"`` or
            ``"spacy"`` (an ``ImportError`` when spaCy or its model is missing).

    Returns:
        a :class:`ParsedExpression`.

    Raises:
        EmptyExpressionError: no word in the expression.
        NoNounError: no noun in it.

    >>> parse("a cat sitting next to the blue cup", parser="rules").head
    'cat'
    """
    if parser not in PARSERS:
        raise ValueError(f"unknown parser {parser!r}: use one of {', '.join(PARSERS)}")
    words = _words(expression)
    if parser != "rules":
        nlp = _spacy_model()
        if nlp is not None:
            return _parse_spacy(nlp, expression, words)
        if parser == "spacy":
            raise ImportError(
                "the spaCy parser needs spaCy and its English model: pip install 'attnlens[nlp]' && "
                "python -m spacy download en_core_web_sm"
            )
    return _parse_rules(expression, words)
