"""Token labels: which word each text token belongs to, and what kind of token it is.

Every text position of a captured attention call gets a string, the word it belongs to, that
word's index in the prompt, and a kind:

========  ==============================================================
kind      meaning
========  ==============================================================
content   part of a content word ("cat", "red")
stop      part of a stop word ("the", "on") or a punctuation mark
pad       padding added to reach the encoder's fixed length
special   a tokenizer's special token (``</s>``, ``<|startoftext|>``), or template text a
          pipeline wraps around the prompt (Qwen-Image's system prompt)
magnet    a token appended on purpose to absorb attention (RefAM)
text      a text position whose token is unknown (no tokenizer was seen)
image     an image or video token (never a text token; listed for completeness)
========  ==============================================================

Given the prompt string, tokens are aligned to it by character offsets (a fast tokenizer's
offset mapping; for slow tokenizers, by matching token text), so that every word of the
prompt has one index whatever tokenizer split it: CLIP's and T5's tokens of one SD3 prompt
share word indices. Words are runs of letters and digits, joined by inner hyphens and
apostrophes (``red-haired``, ``don't``) and by decimal points and thousands separators
between digits (``3.5``, ``1,000``); every other visible character is a word of its own.

>>> from attnlens.testing import tiny_t5_tokenizer
>>> tok = tiny_t5_tokenizer()
>>> labels = label_tokens(tok, tok("the red-cup").input_ids, prompt="the red-cup")
>>> list(zip(labels.token_str, labels.word, labels.word_index.tolist()))
[('▁the', 'the', 0), ('▁red', 'red-cup', 1), ('-', 'red-cup', 1), ('c', 'red-cup', 1), \
('u', 'red-cup', 1), ('p', 'red-cup', 1), ('</s>', '', -1)]
>>> labels.token_kind.tolist()
['stop', 'content', 'content', 'content', 'content', 'content', 'special']
"""

from __future__ import annotations

import bisect
import re
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

__all__ = [
    "TOKEN_KINDS",
    "TokenLabels",
    "TruncationWarning",
    "Word",
    "append_magnets",
    "concat_labels",
    "is_stop_word",
    "label_prompt",
    "label_tokens",
    "split_words",
    "stop_words",
]

TOKEN_KINDS = ("content", "stop", "pad", "special", "magnet", "text", "image")

# Word-start and word-end markers of the sub-word schemes in use: SentencePiece (T5, Gemma),
# byte-level BPE (GPT-2, Qwen) and CLIP's BPE, which marks the *end* of a word.
_START_MARKERS = ("▁", "Ġ")
_END_MARKER = "</w>"
_CONTINUATION = "##"  # WordPiece


# a word: letters/digits joined by inner hyphens or apostrophes, or by . and , between digits
_WORD = re.compile(r"[^\W_]+(?:[-'’][^\W_]+|(?<=\d)[.,]\d+)*")
_ITEM = re.compile(_WORD.pattern + r"|\S")


class TruncationWarning(UserWarning):
    """A prompt was longer than its tokenizer keeps; the message quotes the text that was cut."""


@cache
def stop_words(source: str = "auto") -> frozenset[str]:
    """English stop words (lower case): spaCy's list when the ``nlp`` extra is installed, else a bundled one.

    Args:
        source: ``"auto"`` (spaCy's if importable, else bundled), ``"spacy"`` or ``"bundled"``.

    Only spaCy's word list is read (``spacy.lang.en.stop_words``); no spaCy model is needed.

    >>> "the" in stop_words("bundled") and "cat" not in stop_words("bundled")
    True
    """
    if source not in ("auto", "spacy", "bundled"):
        raise ValueError(f"unknown stop-word source {source!r}: use 'auto', 'spacy' or 'bundled'")
    if source != "bundled":
        try:
            from spacy.lang.en.stop_words import STOP_WORDS
        except ImportError:
            if source == "spacy":
                raise ImportError(
                    "spaCy's stop words need the nlp extra: pip install 'attnlens[nlp]'"
                ) from None
        else:
            return frozenset(w.lower().replace("’", "'") for w in STOP_WORDS)
    text = resources.files("attnlens.data").joinpath("stopwords_en.txt").read_text(encoding="utf-8")
    words = (w for line in text.splitlines() if not line.startswith("#") for w in line.split())
    return frozenset(words)


def is_stop_word(word: str) -> bool:
    """Whether ``word`` is a stop word (case and surrounding punctuation ignored).

    >>> is_stop_word("The"), is_stop_word("mug,")
    (True, False)
    """
    return word.strip(".,;:!?\"'()[]").lower().replace("’", "'") in stop_words()


@dataclass(frozen=True)
class Word:
    """One word of a prompt: its text, character span ``[start, end)`` and kind (content | stop)."""

    text: str
    start: int
    end: int
    kind: str


def split_words(prompt: str) -> list[Word]:
    """The words of ``prompt`` with their character spans (see the module docstring for the rules).

    >>> [(w.text, w.kind) for w in split_words("A red-haired girl, 3.5 m.")]
    [('A', 'stop'), ('red-haired', 'content'), ('girl', 'content'), (',', 'stop'), ('3.5', 'content'), \
('m', 'content'), ('.', 'stop')]
    """
    words = []
    for m in _ITEM.finditer(prompt):
        text = m.group()
        punct = all(unicodedata.category(c).startswith("P") for c in text)
        kind = "stop" if punct or is_stop_word(text) else "content"
        words.append(Word(text, m.start(), m.end(), kind))
    return words


def append_magnets(prompt: str, magnets: Sequence[str], sep: str = " ") -> tuple[str, int]:
    """Append magnet words to a prompt; returns the new prompt and where the magnets start.

    Pass the start as ``magnet_start`` to :func:`label_tokens` / :func:`label_prompt` so that
    the appended tokens are labelled ``magnet``.

    >>> append_magnets("the red mug", [".", "a", "of"])
    ('the red mug . a of', 12)
    """
    if not magnets:
        return prompt, len(prompt)
    start = len(prompt) + len(sep)
    return prompt + sep + " ".join(magnets), start


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
    #: character span ``[char_start, char_end)`` of each token in the prompt, -1 where a token
    #: covers no prompt character; ``None`` when the prompt was not known
    char_start: np.ndarray | None = None
    char_end: np.ndarray | None = None

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


def label_tokens(
    tokenizer: Any,
    input_ids: Sequence[int],
    *,
    prompt: str | None = None,
    magnet_start: int | None = None,
) -> TokenLabels:
    """Label one row of token ids from any Hugging Face tokenizer.

    With ``prompt``, tokens are aligned to it by character offsets: each token gets the
    prompt word it falls in (sub-word pieces of one word share it), ``char_start`` /
    ``char_end``, and the prompt's word index; tokens around the prompt (specials, padding,
    template text a pipeline added) are ``special`` or ``pad``. A :class:`TruncationWarning`
    says what was cut when the ids hold only part of the prompt.

    Without ``prompt``, sub-word tokens are grouped into words by the tokenizer's own markers
    (SentencePiece ``▁``, byte-level ``Ġ``, CLIP's ``</w>``, WordPiece ``##``), or by
    whitespace when a word-level tokenizer has none.

    Args:
        tokenizer: a ``transformers`` tokenizer (slow or fast).
        input_ids: token ids, shape ``(key_text,)``.
        prompt: the text the ids were encoded from (possibly inside a template).
        magnet_start: character offset in ``prompt`` where appended magnet words begin
            (see :func:`append_magnets`); their tokens are labelled ``magnet``.

    Returns:
        :class:`TokenLabels` for the row.
    """
    if prompt is not None:
        return _label_aligned(tokenizer, [int(i) for i in input_ids], prompt, magnet_start)
    if magnet_start is not None:
        raise ValueError("magnet_start is a character offset into the prompt: give prompt as well")
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


def concat_labels(parts: Sequence[TokenLabels]) -> TokenLabels:
    """Labels of consecutive text spans (SD3's ``[CLIP | T5]``) as one row, in order.

    >>> concat_labels([TokenLabels.unknown(2), TokenLabels.unknown(1)]).token_kind.tolist()
    ['text', 'text', 'text']
    """

    def offsets(lab: TokenLabels, name: str) -> np.ndarray:
        value = getattr(lab, name)
        return value if value is not None else np.full(len(lab), -1, dtype=np.int64)

    known = any(p.char_start is not None for p in parts)
    return TokenLabels(
        token_str=np.concatenate([p.token_str for p in parts]),
        word=np.concatenate([p.word for p in parts]),
        word_index=np.concatenate([p.word_index for p in parts]),
        token_kind=np.concatenate([p.token_kind for p in parts]),
        char_start=np.concatenate([offsets(p, "char_start") for p in parts]) if known else None,
        char_end=np.concatenate([offsets(p, "char_end") for p in parts]) if known else None,
    )


def label_prompt(
    tokenizer: Any,
    prompt: str,
    *,
    max_length: int | None = None,
    padding: bool = True,
    magnet_start: int | None = None,
) -> tuple[list[int], TokenLabels]:
    """Tokenize ``prompt`` as a pipeline would, and label the tokens.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        prompt: the prompt.
        max_length: sequence length (default the tokenizer's ``model_max_length``); longer
            prompts are truncated with a :class:`TruncationWarning` naming the cut text.
        padding: pad to ``max_length``.
        magnet_start: where appended magnets begin, see :func:`append_magnets`.

    Returns:
        ``(input_ids, labels)``, both of length ``max_length`` when padding.

    >>> from attnlens.testing import tiny_t5_tokenizer
    >>> ids, labels = label_prompt(tiny_t5_tokenizer(), "the cat", max_length=5)
    >>> labels.token_kind.tolist()
    ['stop', 'content', 'special', 'pad', 'pad']
    """
    limit = max_length or int(getattr(tokenizer, "model_max_length", 0) or 0) or None
    enc = tokenizer(
        prompt,
        padding="max_length" if padding and limit else False,
        max_length=limit,
        truncation=limit is not None,
    )
    ids = [int(i) for i in enc["input_ids"]]
    return ids, label_tokens(tokenizer, ids, prompt=prompt, magnet_start=magnet_start)


def _prompt_pieces(tokenizer: Any, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``prompt`` alone (no special tokens, no truncation) and their character spans."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(
            prompt, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False
        )
        return [int(i) for i in enc["input_ids"]], [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    tokens = tokenizer.tokenize(prompt)
    return [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)], _match_spans(tokens, prompt)


def _match_spans(tokens: Sequence[str], prompt: str) -> list[tuple[int, int]]:
    """Character spans of tokens found in order in ``prompt`` (slow tokenizers have no offsets)."""
    lowered = prompt.lower()
    spans, cursor = [], 0
    for tok in tokens:
        piece = _strip_markers(tok).lower()
        at = lowered.find(piece, cursor) if piece else -1
        if at < 0 or lowered[cursor:at].strip():  # not found, or found past other text
            spans.append((cursor, cursor))
            continue
        spans.append((at, at + len(piece)))
        cursor = at + len(piece)
    return spans


def _locate(ids: list[int], pieces: list[int]) -> tuple[int, int]:
    """Where the longest prefix of ``pieces`` occurs in ``ids``: ``(start, length)``."""
    best = (0, 0)
    for s in range(len(ids)):
        m = 0
        while m < len(pieces) and s + m < len(ids) and ids[s + m] == pieces[m]:
            m += 1
        if m > best[1]:
            best = (s, m)
            if m == len(pieces):
                break
    return best


def _label_aligned(tokenizer: Any, ids: list[int], prompt: str, magnet_start: int | None) -> TokenLabels:
    pieces, spans = _prompt_pieces(tokenizer, prompt)
    start, found = _locate(ids, pieces)
    if pieces and found == 0:
        warnings.warn(
            f"the token ids do not contain the tokens of the prompt {prompt!r}; words are grouped by "
            "token markers instead of character offsets",
            stacklevel=3,
        )
        return label_tokens(tokenizer, ids)
    if found < len(pieces):
        cut = prompt[spans[found][0] :].strip()
        warnings.warn(
            f"prompt truncated: the text encoder saw {found} of its {len(pieces)} tokens "
            f"({len(ids)} positions in all); cut: {cut!r}",
            TruncationWarning,
            stacklevel=3,
        )
    words = split_words(prompt)
    word_at = np.full(len(prompt) + 1, -1, dtype=np.int64)
    for i, w in enumerate(words):
        word_at[w.start : w.end] = i
    starts = [w.start for w in words]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    n = len(ids)
    word_of, index_of = [""] * n, [-1] * n
    kinds, char_start, char_end = [""] * n, np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    seen_end = False
    for pos, tid in enumerate(ids):
        if start <= pos < start + found:
            a, b = spans[pos - start]
            while a < b and prompt[a].isspace():  # byte-level BPE spans include the leading space
                a += 1
            while b > a and prompt[b - 1].isspace():
                b -= 1
            inside = word_at[a:b]
            inside = inside[inside >= 0]
            if len(inside):
                w = int(inside[0])
            else:  # a bare word marker ("▁") or a space: it belongs to the word that follows
                k = bisect.bisect_left(starts, a)
                w = k if k < len(words) else len(words) - 1
            if w >= 0:
                word, magnet = words[w], magnet_start is not None and words[w].start >= magnet_start
                word_of[pos], index_of[pos] = word.text, w
                kinds[pos] = "magnet" if magnet else word.kind
                char_start[pos], char_end[pos] = (a, b) if b > a else (word.start, word.start)
                continue
        # around the prompt: padding (CLIP pads with its end token: the first one ends the text)
        kinds[pos] = "pad" if tid == pad_id and (pad_id != eos_id or seen_end) else "special"
        seen_end = seen_end or (tid == eos_id and pos >= start + found)
    return TokenLabels(
        token_str=np.array([t or "" for t in tokens], dtype=object),
        word=np.array(word_of, dtype=object),
        word_index=np.array(index_of, dtype=np.int64),
        token_kind=np.array(kinds, dtype=object),
        char_start=char_start,
        char_end=char_end,
    )


def _strip_markers(token: str) -> str:
    for marker in _START_MARKERS:
        token = token.removeprefix(marker)
    return token.removeprefix(_CONTINUATION).removesuffix(_END_MARKER)
