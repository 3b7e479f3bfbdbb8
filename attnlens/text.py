"""Token labels: which word each text token belongs to, and what kind of token it is.

Every text position of a captured attention call gets a string, the word it belongs to, that
word's index in the prompt, and a kind:

========  ==============================================================
kind      meaning
========  ==============================================================
content   part of a content word ("cat", "red")
stop      part of a stop word ("the", "on")
pad       padding added to reach the encoder's fixed length
special   a tokenizer's special token (``</s>``, ``<|startoftext|>``)
magnet    a token appended on purpose to absorb attention (RefAM)
text      a text position whose token is unknown (no tokenizer was seen)
image     an image or video token (never a text token; listed for completeness)
========  ==============================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

__all__ = ["TOKEN_KINDS", "TokenLabels", "is_stop_word", "label_tokens", "stop_words"]

TOKEN_KINDS = ("content", "stop", "pad", "special", "magnet", "text", "image")

# Word-start and word-end markers of the sub-word schemes in use: SentencePiece (T5, Gemma),
# byte-level BPE (GPT-2, Qwen) and CLIP's BPE, which marks the *end* of a word.
_START_MARKERS = ("▁", "Ġ")
_END_MARKER = "</w>"
_CONTINUATION = "##"  # WordPiece


@cache
def stop_words() -> frozenset[str]:
    """The bundled English stop-word list (lower case).

    >>> "the" in stop_words() and "cat" not in stop_words()
    True
    """
    text = resources.files("attnlens.data").joinpath("stopwords_en.txt").read_text(encoding="utf-8")
    words = (w for line in text.splitlines() if not line.startswith("#") for w in line.split())
    return frozenset(words)


def is_stop_word(word: str) -> bool:
    """Whether ``word`` is a stop word (case and surrounding punctuation ignored).

    >>> is_stop_word("The"), is_stop_word("mug,")
    (True, False)
    """
    return word.strip(".,;:!?\"'()[]").lower() in stop_words()


@dataclass(frozen=True)
class TokenLabels:
    """Labels of the text positions of one sample, each array of shape ``(key_text,)``.

    Attributes:
        token_str: the tokenizer's token strings ("" where unknown).
        word: the word each token belongs to, markers removed ("" for pad/special).
        word_index: index of that word in the prompt, -1 for pad and special tokens.
        token_kind: one of :data:`TOKEN_KINDS`.
    """

    token_str: np.ndarray
    word: np.ndarray
    word_index: np.ndarray
    token_kind: np.ndarray

    def __len__(self) -> int:
        return len(self.token_str)

    @classmethod
    def unknown(cls, n: int) -> TokenLabels:
        """Labels for ``n`` text positions whose tokens were never seen.

        >>> TokenLabels.unknown(2).token_kind.tolist()
        ['text', 'text']
        """
        return cls(
            token_str=np.full(n, "", dtype=object),
            word=np.full(n, "", dtype=object),
            word_index=np.full(n, -1, dtype=np.int64),
            token_kind=np.full(n, "text", dtype=object),
        )


def label_tokens(tokenizer: Any, input_ids: Sequence[int]) -> TokenLabels:
    """Label one row of token ids from any Hugging Face tokenizer.

    Sub-word tokens are grouped into words by the tokenizer's own markers (SentencePiece
    ``▁``, byte-level ``Ġ``, CLIP's ``</w>``, WordPiece ``##``), or by whitespace when a
    word-level tokenizer has none.

    Args:
        tokenizer: a ``transformers`` tokenizer (slow or fast).
        input_ids: token ids, shape ``(key_text,)``.

    Returns:
        :class:`TokenLabels` for the row.
    """
    ids = [int(i) for i in input_ids]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    pad_id = tokenizer.pad_token_id
    special = set(tokenizer.all_special_ids)
    uses_markers = any(
        t.startswith(_START_MARKERS) or t.endswith(_END_MARKER) or t.startswith(_CONTINUATION)
        for t in tokens
        if t is not None
    )
    wordpiece = any(t.startswith(_CONTINUATION) for t in tokens if t is not None)
    index_of: list[int] = []
    kinds: list[str] = []
    words: list[list[int]] = []  # token positions of each word
    word_ended = True
    for pos, (tid, tok) in enumerate(zip(ids, tokens, strict=True)):
        tok = tok or ""
        if tid in special or (pad_id is not None and tid == pad_id):
            kinds.append("pad" if tid == pad_id else "special")
            index_of.append(-1)
            word_ended = True
            continue
        starts = tok.startswith(_START_MARKERS) or (word_ended and not tok.startswith(_CONTINUATION))
        if starts or not words:
            words.append([])
        words[-1].append(pos)
        index_of.append(len(words) - 1)
        kinds.append("")
        word_ended = not uses_markers or wordpiece or tok.endswith(_END_MARKER)
    word_of = [""] * len(ids)
    for positions in words:
        text = "".join(_strip_markers(tokens[p] or "") for p in positions)
        kind = "stop" if is_stop_word(text) else "content"
        for p in positions:
            word_of[p] = text
            kinds[p] = kind
    return TokenLabels(
        token_str=np.array([t or "" for t in tokens], dtype=object),
        word=np.array(word_of, dtype=object),
        word_index=np.array(index_of, dtype=np.int64),
        token_kind=np.array(kinds, dtype=object),
    )


def _strip_markers(token: str) -> str:
    for marker in _START_MARKERS:
        token = token.removeprefix(marker)
    return token.removeprefix(_CONTINUATION).removesuffix(_END_MARKER)
