"""Token ↔ word alignment over real-looking prompts and the tokenizer families in use.

Tokenizers are built offline: SentencePiece-style T5 and CLIP BPE from ``attnlens.testing``,
the ShapesRef word-level tokenizer, a byte-level BPE (GPT-2 / Qwen style), and a "slow" view
without offset mapping, which exercises the fallback that matches token text to the prompt.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import numpy as np
import pytest

from attnlens.datasets.shapesref import build_tokenizer
from attnlens.testing import tiny_byte_level_tokenizer, tiny_clip_tokenizer, tiny_t5_tokenizer
from attnlens.text import (
    TruncationWarning,
    append_magnets,
    is_stop_word,
    label_prompt,
    label_tokens,
    split_words,
    stop_words,
)

PROMPTS = [
    "a red mug on the table",
    "A photo of a red-haired girl, smiling.",
    "two cats and 3.5 dogs near the 1,000-year-old tree",
    "the dog's bowl isn't blue!",
    "a café in Zürich, naïve art 🐱",
    "  a   wooden table  ",
    "中国的猫 on a mat",
    "(left) big cup; right: small cup?",
]


class SlowView:
    """A tokenizer without offset mapping (``is_fast`` False), backed by the tiny T5 vocabulary."""

    is_fast = False

    def __init__(self) -> None:
        self._tok = tiny_t5_tokenizer(64)
        self.pad_token_id, self.eos_token_id = self._tok.pad_token_id, self._tok.eos_token_id
        self.all_special_ids = self._tok.all_special_ids

    def tokenize(self, text: str) -> list[str]:
        return self._tok.tokenize(text)

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return self._tok.convert_tokens_to_ids(tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self._tok.convert_ids_to_tokens(ids)

    def __call__(self, text: str, **kwargs):
        return self._tok(text, **kwargs)


TOKENIZERS = {
    "t5": lambda: tiny_t5_tokenizer(64),
    "clip": tiny_clip_tokenizer,
    "word-level": lambda: build_tokenizer(max_length=64),
    "byte-level": tiny_byte_level_tokenizer,
    "slow": SlowView,
}


def labels_for(tokenizer, prompt: str, length: int = 64):
    enc = tokenizer(prompt, padding="max_length", max_length=length, truncation=True)
    return label_tokens(tokenizer, enc["input_ids"], prompt=prompt)


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_token_lies_in_its_word_and_every_word_is_covered(name, prompt):
    tokenizer = TOKENIZERS[name]()
    labels = labels_for(tokenizer, prompt)
    words = split_words(prompt)
    index = labels.word_index
    on_words = np.flatnonzero(index >= 0)
    assert set(index[on_words]) == set(range(len(words))), "every word of the prompt has a token"
    assert (np.diff(index[on_words]) >= 0).all(), "tokens follow the prompt's word order"
    for pos in on_words:
        word = words[index[pos]]
        assert labels.word[pos] == word.text == prompt[word.start : word.end]
        assert labels.token_kind[pos] == word.kind
        start, end = labels.char_start[pos], labels.char_end[pos]
        assert word.start <= start <= end <= word.end
    for w in range(len(words)):  # a word's tokens are contiguous
        at = np.flatnonzero(index == w)
        assert (np.diff(at) == 1).all()
    off = np.flatnonzero(index < 0)
    assert set(labels.token_kind[off]) <= {"special", "pad"} and (labels.word[off] == "").all()


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("A photo of a red-haired girl, smiling.", "A|photo|of|a|red-haired|girl|,|smiling|."),
        ("two cats and 3.5 dogs near the 1,000-year-old tree", "two|cats|and|3.5|dogs|near|the|1,000-year-old|tree"),  # noqa: E501
        ("the dog's bowl isn't blue!", "the|dog's|bowl|isn't|blue|!"),
        ("a café in Zürich, naïve art 🐱", "a|café|in|Zürich|,|naïve|art|🐱"),
        ("cats,dogs and 3.", "cats|,|dogs|and|3|."),
        ("中国的猫 on a mat", "中国的猫|on|a|mat"),
    ],
)  # fmt: skip
def test_words_keep_hyphens_apostrophes_and_numbers_together(prompt, expected):
    words = split_words(prompt)
    assert [w.text for w in words] == expected.split("|")
    assert all(prompt[w.start : w.end] == w.text for w in words)


def test_sub_word_pieces_of_one_word_share_it_and_encoders_agree_on_word_indices():
    prompt = "A photo of a red-haired girl, smiling."
    t5, clip = labels_for(tiny_t5_tokenizer(64), prompt), labels_for(tiny_clip_tokenizer(), prompt)
    for labels in (t5, clip):
        haired = np.flatnonzero(labels.word == "red-haired")
        assert len(haired) > 2  # split into pieces, grouped into one word
        assert set(labels.word_index[haired]) == {4}
        assert labels.token_kind[labels.word == ","].tolist() == ["stop"]
    as_dict = [dict(zip(lab.word_index.tolist(), lab.word.tolist(), strict=True)) for lab in (t5, clip)]
    assert as_dict[0] == as_dict[1]


def test_special_and_padding_tokens_around_the_prompt():
    t5 = labels_for(tiny_t5_tokenizer(16), "the red mug", length=8)
    assert t5.token_kind.tolist() == ["stop", "content", "content", "special"] + ["pad"] * 4
    # CLIP pads with its end token: the first one ends the text, the others are padding
    clip = labels_for(tiny_clip_tokenizer(), "the red mug", length=8)
    assert clip.token_kind.tolist() == [
        "special",
        "stop",
        "content",
        "content",
        "special",
        "pad",
        "pad",
        "pad",
    ]
    assert clip.char_start.tolist()[:5] == [-1, 0, 4, 8, -1]
    empty = labels_for(tiny_t5_tokenizer(16), "", length=4)
    assert empty.token_kind.tolist() == ["special", "pad", "pad", "pad"] and (empty.word_index == -1).all()


def test_unknown_characters_stay_inside_their_word():
    labels = labels_for(tiny_t5_tokenizer(64), "a café")  # é is not in the tiny vocabulary
    cafe = np.flatnonzero(labels.word == "café")
    assert "<unk>" in labels.token_str[cafe].tolist()
    assert set(labels.token_kind[cafe]) == {"content"}


def test_truncated_prompts_warn_with_the_text_that_was_cut():
    prompt = "a red mug on the table near a small blue cup"
    tokenizer = tiny_t5_tokenizer(8)  # 7 words and </s>
    with pytest.warns(TruncationWarning, match=r"saw 7 of its 11 tokens.*cut: 'a small blue cup'"):
        ids, labels = label_prompt(tokenizer, prompt)
    assert len(ids) == 8
    kept = [w for w in dict.fromkeys(labels.word.tolist()) if w]
    assert kept == "a red mug on the table near".split()
    clip = tiny_clip_tokenizer(model_max_length=6)  # <|startoftext|>, 4 words, <|endoftext|>
    with pytest.warns(TruncationWarning, match=r"cut: 'the table near a small blue cup'"):
        label_prompt(clip, prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        label_prompt(tiny_t5_tokenizer(16), prompt)  # fits: no warning


def test_appended_magnets_are_marked():
    prompt, start = append_magnets("the red mug", [".", "a", "of"])
    assert prompt == "the red mug . a of" and prompt[start:] == ". a of"
    for tokenizer in (tiny_t5_tokenizer(16), tiny_clip_tokenizer()):
        _, labels = label_prompt(tokenizer, prompt, max_length=12, magnet_start=start)
        kinds = {int(i): k for k, i in zip(labels.token_kind, labels.word_index, strict=True) if i >= 0}
        assert list(kinds.values()) == ["stop", "content", "content", "magnet", "magnet", "magnet"]
    with pytest.raises(ValueError, match="give prompt"):
        label_tokens(tiny_t5_tokenizer(), [1], magnet_start=3)


def test_ids_that_do_not_hold_the_prompt_fall_back_to_token_markers():
    tok = tiny_t5_tokenizer(16)
    ids = tok("the red mug").input_ids
    with pytest.warns(UserWarning, match="do not contain the tokens"):
        labels = label_tokens(tok, ids, prompt="a blue cup")
    assert labels.word.tolist()[:3] == ["the", "red", "mug"] and labels.char_start is None


def test_template_tokens_around_the_prompt_are_special():
    tokenizer = tiny_byte_level_tokenizer()
    prompt = "a red mug"
    template = "<|im_start|>user\n{}<|im_end|>"
    ids = tokenizer(template.format(prompt)).input_ids
    labels = label_tokens(tokenizer, ids, prompt=prompt)
    assert [w for w in dict.fromkeys(labels.word.tolist()) if w] == ["a", "red", "mug"]
    assert set(labels.token_kind[labels.word_index < 0]) == {"special"}


def test_stop_words_come_from_spacy_when_it_is_installed(monkeypatch):
    fake = types.ModuleType("spacy.lang.en.stop_words")
    fake.STOP_WORDS = {"the", "whereupon", "n‘t"}
    for name in ("spacy", "spacy.lang", "spacy.lang.en"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "spacy.lang.en.stop_words", fake)
    stop_words.cache_clear()
    try:
        assert "whereupon" in stop_words() and "whereupon" not in stop_words("bundled")
        assert is_stop_word("Whereupon,") and not is_stop_word("of")  # spaCy's list replaces the bundled one
        assert [w.kind for w in split_words("whereupon the cat")] == ["stop", "stop", "content"]
    finally:
        stop_words.cache_clear()


def test_bundled_stop_words_work_without_spacy():
    if importlib.util.find_spec("spacy") is None:
        with pytest.raises(ImportError, match=r"attnlens\[nlp\]"):
            stop_words("spacy")
    words = stop_words("bundled")
    assert {"the", "a", "of", "on", "and"} <= words and not {"cat", "red", "left"} & words
    assert is_stop_word("The") and is_stop_word("isn't") is False  # contractions split: "n't" is listed
    with pytest.raises(ValueError, match="unknown stop-word source"):
        stop_words("nltk")
