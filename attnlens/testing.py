"""Tiny random-config FLUX models and offline tokenizers, for tests, examples and benchmarks.

Configs follow diffusers' own pipeline tests; tokenizers are built with the ``tokenizers``
library from a small English vocabulary, so nothing is downloaded.

>>> from attnlens.testing import tiny_flux_transformer, flux_inputs
>>> model = tiny_flux_transformer()
>>> out = model(**flux_inputs(model, height=4, width=4)).sample
>>> tuple(out.shape)
(1, 16, 4)
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "flux_inputs",
    "tiny_byte_level_tokenizer",
    "tiny_clip_tokenizer",
    "tiny_flux_pipeline",
    "tiny_flux_transformer",
    "tiny_t5_tokenizer",
]

_WORDS = tuple(
    "a an the of on in at to and with is are by from under over near next behind left right top bottom "
    "middle cat dog mug cup red blue green yellow black white small large big photo picture table "
    "sitting standing person car tree house sky grass wooden old new two three one".split()
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,-'!?"


def tiny_flux_transformer(seed: int = 0, **config: Any):
    """A ``FluxTransformer2DModel`` with 1 double and 1 single block (override any config field).

    Shapes: ``in_channels=4`` latent channels per token, ``joint_attention_dim=32``,
    2 heads × 16.
    """
    from diffusers import FluxTransformer2DModel

    defaults = dict(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**defaults, **config}).eval()


def flux_inputs(
    model,
    *,
    height: int = 4,
    width: int = 4,
    batch: int = 1,
    text_len: int = 8,
    timestep: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Random keyword inputs for a FLUX transformer over a ``height × width`` token grid.

    ``hidden_states`` is ``(batch, height·width, in_channels)`` and ``encoder_hidden_states``
    ``(batch, text_len, joint_attention_dim)``; ``timestep`` is in ``[0, 1]`` as the pipeline
    passes it.
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    inputs = dict(
        hidden_states=torch.randn(batch, height * width, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), float(timestep)),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_len, 3),
    )
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def tiny_t5_tokenizer(model_max_length: int = 16):
    """A SentencePiece-style (Unigram, ``▁`` word marks) T5 tokenizer over a small vocabulary.

    >>> tok = tiny_t5_tokenizer()
    >>> tok.convert_ids_to_tokens(tok("the red mug").input_ids)
    ['▁the', '▁red', '▁mug', '</s>']
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0) for w in _WORDS] + [(c, -5.0) for c in _LETTERS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A CLIP-style BPE tokenizer (``</w>`` word ends) over a small vocabulary.

    >>> tok = tiny_clip_tokenizer()
    >>> tok.convert_ids_to_tokens(tok("the red mug").input_ids)
    ['<|startoftext|>', 'the</w>', 'red</w>', 'mug</w>', '<|endoftext|>']
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate([*specials, *_LETTERS, *(c + "</w>" for c in _LETTERS)])}
    merges = []
    for word in _WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token="<|endoftext|>")
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[(s, vocab[s]) for s in specials],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=specials[0],
        eos_token=specials[1],
        pad_token=specials[1],
        unk_token=specials[1],
        model_max_length=model_max_length,
    )


def tiny_byte_level_tokenizer(specials: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")):
    """A GPT-2 / Qwen-style byte-level BPE (``Ġ`` marks a leading space) with merges for :data:`_WORDS`.

    ``<|endoftext|>`` (id 0) is the end and padding token; ``specials`` are added as special
    tokens, as in chat templates.

    >>> tok = tiny_byte_level_tokenizer()
    >>> tok.convert_ids_to_tokens(tok("the red mug").input_ids)
    ['the', 'Ġred', 'Ġmug']
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<|endoftext|>", *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    merges = []
    for word in _WORDS:
        pieces = list(word)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
        merges.append(("Ġ", word))  # the word after a space: one token, as in GPT-2's vocabulary
        vocab.setdefault("Ġ" + word, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(dict.fromkeys(merges))))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    out.add_special_tokens({"additional_special_tokens": list(specials)})
    return out


def tiny_flux_pipeline(seed: int = 0, max_sequence_length: int = 16, **transformer_config: Any):
    """A ``FluxPipeline`` of tiny random parts: VAE, CLIP and T5 text encoders, transformer.

    Images of ``height = width = 16`` pixels give an ``8 × 8`` latent and ``4 × 4`` token grid.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5_tok = tiny_t5_tokenizer(max_sequence_length)
    clip_tok = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(clip_tok),
            projection_dim=32,
            max_position_embeddings=77,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 4),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=tiny_flux_transformer(seed, **transformer_config),
    )
