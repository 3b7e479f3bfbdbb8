"""Tiny random-config models and offline tokenizers, for tests, examples and benchmarks.

FLUX, Wan, CogVideoX and Mochi pipelines and SAM2 segmenters; configs follow diffusers' and
transformers' own tests; tokenizers are built with the ``tokenizers`` library from a small
English vocabulary, so nothing is downloaded.

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
    "LABELME_EXPRESSIONS",
    "LABELME_VIDEO_EXPRESSIONS",
    "flux_inputs",
    "labelme_benchmarks",
    "labelme_examples",
    "tiny_byte_level_tokenizer",
    "tiny_chroma",
    "tiny_chroma_pipeline",
    "tiny_clip_tokenizer",
    "tiny_cogvideox_pipeline",
    "tiny_flux2",
    "tiny_flux2_klein_pipeline",
    "tiny_flux_pipeline",
    "tiny_flux_transformer",
    "tiny_hunyuan_pipeline",
    "tiny_ltx_pipeline",
    "tiny_mochi_pipeline",
    "tiny_qwen",
    "tiny_qwen_pipeline",
    "tiny_sam2",
    "tiny_sd3",
    "tiny_sd3_pipeline",
    "tiny_shapes_pipeline",
    "tiny_t5_tokenizer",
    "tiny_wan_pipeline",
    "write_davis_folder",
    "write_refer_folder",
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
    from transformers import CLIPTextConfig, CLIPTextModel

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
    t5 = _tiny_t5(t5_tok)
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


def tiny_shapes_pipeline(seed: int = 0):
    """An untrained embedded :class:`~attnlens.zoo.ShapesPipeline`: 1 double and 1 single block, 2 heads × 16.

    It reads ShapesRef's vocabulary and ``64 × 64`` images (an ``8 × 8`` token grid).
    """
    from .zoo.shapes import ShapesPipeline

    return ShapesPipeline.untrained(tiny_shapes_config(), seed=seed)


def tiny_shapes_config(world: str = "v1"):
    """The :class:`~attnlens.zoo.ShapesConfig` of :func:`tiny_shapes_pipeline`, sized for ``world``."""
    from .zoo.shapes import ShapesConfig

    return ShapesConfig.for_world(
        world, num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16
    )


def _tiny_t5(tokenizer: Any, d_model: int = 32, num_layers: int = 2, num_heads: int = 4):
    """A random ``T5EncoderModel`` over ``tokenizer``'s vocabulary (the caller seeds torch)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=num_layers,
        num_heads=num_heads,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


# -- video pipelines: a clip of 1 + 4k (Wan, CogVideoX) or 1 + 6k (Mochi) frames of 16·n pixels -------------


def tiny_wan_transformer(seed: int = 0, **config: Any):
    """A random ``WanTransformer3DModel``: patches of ``1 × 2 × 2``, 2 blocks, 2 heads × 12, 16
    latent channels, text width 32; ``config`` overrides any of it."""
    from diffusers import WanTransformer3DModel

    defaults = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**defaults, **config}).eval()


def tiny_cogvideox_transformer(seed: int = 0, **config: Any):
    """A random ``CogVideoXTransformer3DModel`` with 3D rotary embeddings: ``patch_size=2``, 2 blocks,
    2 heads × 16, 4 latent channels, text width 8, 16 text tokens; ``config`` overrides any of it."""
    from diffusers import CogVideoXTransformer3DModel

    defaults = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=8,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=8,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=True,
    )
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(**{**defaults, **config}).eval()


def tiny_mochi_transformer(seed: int = 0, **config: Any):
    """A random ``MochiTransformer3DModel``: ``patch_size=2``, 2 blocks, 2 heads × 8, 4 latent
    channels, text width 16, 16 text tokens; ``config`` overrides any of it."""
    from diffusers import MochiTransformer3DModel

    defaults = dict(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        text_embed_dim=16,
        time_embed_dim=4,
        max_sequence_length=16,
    )
    torch.manual_seed(seed)
    return MochiTransformer3DModel(**{**defaults, **config}).eval()


def tiny_wan_pipeline(seed: int = 0, max_sequence_length: int = 16):
    """A ``WanPipeline`` of tiny random parts: Wan VAE (8× spatial, 4× temporal), UMT5-like T5, transformer.

    A clip of ``(frames, 32, 32)`` pixels gives a ``((frames − 1)/4 + 1, 4, 4)`` latent and a
    ``(latent frames, 2, 2)`` token grid (patches of ``1 × 2 × 2``); 2 blocks, 2 heads × 12.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    tokenizer = tiny_t5_tokenizer(max_sequence_length)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    text_encoder = _tiny_t5(tokenizer, num_layers=1, num_heads=2)
    transformer = tiny_wan_transformer(seed)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer,
    )


def tiny_cogvideox_pipeline(seed: int = 0, max_sequence_length: int = 16):
    """A ``CogVideoXPipeline`` of tiny random parts: CogVideoX VAE (8× spatial, 4× temporal), T5, transformer.

    The transformer has 3D rotary embeddings (CogVideoX 1.0 5B style), ``patch_size=2``, 2 blocks,
    2 heads × 16 and ``max_text_seq_length = max_sequence_length``; its scheduler is
    ``CogVideoXDDIMScheduler`` (v-prediction).
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    tokenizer = tiny_t5_tokenizer(max_sequence_length)
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    text_encoder = _tiny_t5(tokenizer, num_layers=1, num_heads=2)
    transformer = tiny_cogvideox_transformer(
        seed,
        text_embed_dim=32,
        sample_width=4,
        sample_height=4,
        sample_frames=5,
        max_text_seq_length=max_sequence_length,
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(prediction_type="v_prediction"),
    )


def tiny_mochi_pipeline(seed: int = 0, max_sequence_length: int = 16):
    """A ``MochiPipeline`` of tiny random parts: Mochi VAE (8× spatial, 6× temporal), T5, transformer.

    Its scheduler inverts sigmas as Mochi's does (timesteps rise from noise towards data); the
    transformer has ``patch_size=2``, 2 blocks, 2 heads × 8.
    """
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline

    tokenizer = tiny_t5_tokenizer(max_sequence_length)
    torch.manual_seed(seed)
    vae = AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    ).eval()
    text_encoder = _tiny_t5(tokenizer, num_layers=1, num_heads=2)
    transformer = tiny_mochi_transformer(
        seed, in_channels=12, text_embed_dim=32, max_sequence_length=max_sequence_length
    )
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


# -- SAM2: tiny random segmenters, and processors that need no torchvision -----------------------------------

# transformers' IMAGENET_DEFAULT_MEAN / IMAGENET_DEFAULT_STD and its processors' default rescale factor
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_RESCALE = 1 / 255


def _rgb_uint8(image: Any) -> torch.Tensor:
    """One image (PIL, or an ``(H, W)`` / ``(H, W, 3)`` uint8 array or tensor) → ``(3, H, W)`` uint8."""
    import numpy as np

    if hasattr(image, "getbands"):  # PIL: transparency goes onto white, as transformers' convert_to_rgb does
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            from PIL import Image

            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = np.array(image.convert("RGB"))
    x = torch.as_tensor(np.asarray(image))
    if x.ndim == 2:  # grey: repeated into three channels
        x = x[..., None].expand(-1, -1, 3)
    if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(
            f"the torch-only SAM2 processors take RGB uint8 images (H, W, 3), grey (H, W) or PIL images; got "
            f"{x.dtype} {tuple(x.shape)} (install torchvision for transformers' own processors)"
        )
    return x.permute(2, 0, 1).contiguous()


def _resizes_uint8_natively(capability: str | None = None, machine: str | None = None) -> bool:
    """Whether torchvision's bilinear ``resize`` keeps uint8 in uint8 on this CPU (or on the one named).

    It does on AVX2/AVX512 x86 and on ARM CPUs; elsewhere it resizes through float32 and rounds back, which
    differs by at most one grey level.
    """
    import platform

    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    machine = platform.machine() if machine is None else machine
    return capability in ("AVX2", "AVX512") or machine in ("aarch64", "arm64")


def _resize_uint8(x: torch.Tensor, side: int) -> torch.Tensor:
    """``(n, 3, H, W)`` uint8 → ``(n, 3, side, side)`` uint8, as torchvision's ``resize`` does it.

    Bilinear with antialiasing (shrinking averages over every source pixel, not just the 4 nearest),
    in uint8 (see :func:`_resizes_uint8_natively`); an image already ``side × side`` is left as it is.
    """
    if tuple(x.shape[-2:]) == (side, side):
        return x
    resize = dict(size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    if _resizes_uint8_natively():
        return torch.nn.functional.interpolate(x, **resize)
    return torch.nn.functional.interpolate(x.float(), **resize).round_().to(torch.uint8)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → ``(x - mean) / std`` in float32, rescale and normalisation fused as in transformers."""
    mean = torch.tensor(_IMAGENET_MEAN) * (1.0 / _RESCALE)  # the same float32 constants, the same rounding
    std = torch.tensor(_IMAGENET_STD) * (1.0 / _RESCALE)
    return x.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def _square_pixels(images: Any, side: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Images (PIL, ``(H, W, 3)``, ``(T, H, W, 3)`` uint8) → ``(n, 3, side, side)`` normalised, and sizes."""
    import numpy as np

    if not isinstance(images, list | tuple):
        if hasattr(images, "getbands"):
            images = [images]
        else:
            arr = torch.as_tensor(np.asarray(images))
            images = list(arr) if arr.ndim == 4 else [arr]
    pixels, sizes = [], []
    for image in images:
        x = _rgb_uint8(image)
        pixels.append(_normalise(_resize_uint8(x[None], side))[0])
        sizes.append([int(x.shape[1]), int(x.shape[2])])
    return torch.stack(pixels), sizes


def _sam2_processors(side: int) -> tuple[Any, Any]:
    """``(image processor, video processor)``: transformers' own with torchvision installed, else stand-ins.

    transformers' ``Sam2ImageProcessor`` and ``Sam2VideoVideoProcessor`` need torchvision, which does not
    import beside the CPU torch this project installs; the stand-ins do what they do with
    ``size={"height": side, "width": side}`` using torch alone:

    - images: PIL (transparency composited onto white, grey repeated), ``(H, W, 3)`` uint8 arrays, or
      ``(T, H, W, 3)`` clips → resized to ``side × side`` bilinearly *with antialiasing*, in uint8, then
      ``(x / 255 - mean) / std`` with ImageNet's mean and std (fused as ``(x - 255 mean) / (255 std)``);
      ``original_sizes`` ``(n, 2)`` (height, width); the video processor adds ``reshaped_input_sizes``;
    - masks: ``post_process_masks`` upsamples the low-resolution logits bilinearly (no antialiasing) to
      each original size and cuts them at ``mask_threshold`` (0).

    Point prompts are not theirs: ``Sam2Processor`` / ``Sam2VideoProcessor`` (which import without
    torchvision) scale them from the ``original_sizes`` the stand-ins return.

    ``tests/test_sam2_processors.py`` checks the stand-ins against the real processors' outputs,
    saved once in ``tests/fixtures/sam2_reference.npz`` (odd-sized, grey and transparent images,
    clips, point prompts, fixed mask logits; sides 64 and 96) by ``tests/fixtures/make_sam2_reference.py``
    run with transformers 5.24.0, torch 2.14.1 and torchvision 0.29.1 on an AVX512 CPU: sizes, scaled
    points and post-processed masks are equal, and so are the pixels to the bit (within one grey level
    on a CPU without AVX2, where torchvision resizes through float32). To regenerate it, in a throwaway
    venv outside the repository (never the project's: that torch is a 5.5 GB CUDA build)::

        python3 -m venv /tmp/tv-venv
        /tmp/tv-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
        /tmp/tv-venv/bin/pip install transformers==<the project's version> numpy pillow
        /tmp/tv-venv/bin/python tests/fixtures/make_sam2_reference.py
    """
    import importlib.util

    size = {"height": side, "width": side}
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import Sam2ImageProcessor, Sam2VideoVideoProcessor

        return Sam2ImageProcessor(size=size), Sam2VideoVideoProcessor(size=size)

    from transformers.feature_extraction_utils import BatchFeature
    from transformers.image_processing_utils import ImageProcessingMixin
    from transformers.video_processing_utils import VideoProcessorMixin

    class SquareImageProcessor(ImageProcessingMixin):
        model_input_names = ("pixel_values",)

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.size = dict(size)

        def __call__(self, images: Any, segmentation_maps: Any = None, return_tensors: Any = None, **kwargs):
            pixels, sizes = _square_pixels(images, side)
            return BatchFeature({"pixel_values": pixels, "original_sizes": torch.tensor(sizes)})

        def post_process_masks(
            self, masks, original_sizes, mask_threshold=0.0, binarize=True, *args, **kwargs
        ):
            sizes = original_sizes.tolist() if hasattr(original_sizes, "tolist") else original_sizes
            out = []
            for mask, hw in zip(masks, sizes, strict=True):
                up = torch.nn.functional.interpolate(
                    torch.as_tensor(mask).float(), [int(v) for v in hw], mode="bilinear", align_corners=False
                )
                out.append(up > mask_threshold if binarize else up)
            return out

    class SquareVideoProcessor(VideoProcessorMixin):
        model_input_names = ("pixel_values_videos",)

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.size = dict(size)

        def __call__(self, videos: Any, device: Any = None, return_tensors: Any = None, **kwargs):
            pixels, sizes = _square_pixels(videos, side)
            return BatchFeature(
                {
                    "pixel_values_videos": pixels[None].to(device or "cpu"),
                    "original_sizes": torch.tensor(sizes[:1]),
                    "reshaped_input_sizes": torch.tensor([[side, side]]),
                }
            )

    return SquareImageProcessor(), SquareVideoProcessor()


def tiny_sam2(side: int = 64, *, video: bool = False, seed: int = 0) -> tuple[Any, Any]:
    """A tiny random SAM2 ``(model, processor)``: Sam2Model, or with ``video=True`` Sam2VideoModel.

    A Hiera backbone of four stages of 1, 1, 2, 1 blocks (8 → 64 channels, patch stride 4), an
    FPN (16 wide; 128 for video) over ``side/4``, ``side/8`` and ``side/16`` feature maps, a
    one-layer mask decoder with 3 multimask outputs and (video) a one-layer memory attention
    over 2 memories. ``side`` is the model's square input, a multiple of 32. transformers' SAM2
    processors need torchvision; where it is missing, stand-ins that preprocess alike take
    their place (checked against the real processors' saved outputs: see ``_sam2_processors``).
    """
    import importlib.util

    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2Model,
        Sam2Processor,
        Sam2PromptEncoderConfig,
        Sam2VideoConfig,
        Sam2VideoModel,
        Sam2VideoProcessor,
        Sam2VisionConfig,
    )

    if side % 32:
        raise ValueError(f"side must be a multiple of 32 (the backbone's stride); got {side}")
    # the video model's memory attention reads 64-channel memories and splits its wider features into them
    width = 128 if video else 16
    backbone = Sam2HieraDetConfig(
        hidden_size=8,
        image_size=side,
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[2, 2, 2, 2],
        global_attention_blocks=[3],  # the second block of stage 3 (a first block pools its queries)
        window_positional_embedding_background_size=[2, 2],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=[64, 32, 16, 8],
        backbone_feature_sizes=[[side // 4] * 2, [side // 8] * 2, [side // 16] * 2],
        fpn_hidden_size=width,
    )
    prompt = dict(hidden_size=width, image_size=side, patch_size=16, mask_input_channels=4)
    decoder = dict(
        hidden_size=width, mlp_dim=16, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=8
    )
    image_processor, video_processor = _sam2_processors(side)
    torch.manual_seed(seed)
    if not video:
        config = Sam2Config(
            vision_config=vision,
            prompt_encoder_config=Sam2PromptEncoderConfig(**prompt),
            mask_decoder_config=Sam2MaskDecoderConfig(**decoder),
            image_size=side,
        )
        return Sam2Model(config).eval(), Sam2Processor(image_processor=image_processor)
    config = Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config=prompt,
        mask_decoder_config=decoder,
        image_size=side,
        num_maskmem=2,
        memory_attention_hidden_size=width,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=16,
        memory_attention_rope_feat_sizes=[side // 16] * 2,
        memory_encoder_hidden_size=width,
        memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=width,
        memory_fuser_embed_dim=width,
        memory_fuser_intermediate_dim=16,
    )
    if importlib.util.find_spec("torchvision") is not None:
        processor = Sam2VideoProcessor(image_processor=image_processor, video_processor=video_processor)
    else:  # its class check looks video processors up among torchvision-only classes: set what it would
        processor = Sam2VideoProcessor.__new__(Sam2VideoProcessor)
        processor.image_processor, processor.video_processor = image_processor, video_processor
        processor.point_pad_value, processor.target_size = -10, side
    model = Sam2VideoModel(config).eval()
    # random weights score the object near 0, which SAM2 reads as "no object here" (an empty mask on every
    # frame): a positive bias on the object-score head makes the tiny model see one
    with torch.no_grad():
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(1.0)
    return model, processor


# -- benchmark folders in the real formats: written from arrays, or from Debian's labelme photographs -------


def write_refer_folder(
    root: Any,
    images: dict[str, Any],
    refs: list[dict[str, Any]],
    *,
    dataset: str = "refcoco",
    split_by: str = "unc",
) -> Any:
    """Write a RefCOCO-family folder in the ``refer`` toolkit's layout; returns ``root``.

    Args:
        root: the folder (created).
        images: COCO ``file_name`` → ``(H, W, 3)`` uint8 array or the path of an image file.
        refs: one dict per referred object: ``file_name``, ``segmentation`` (COCO polygons or
            RLE), ``sentences`` (strings) and ``split``; optionally ``category_id``.
    """
    import json
    import pickle
    import shutil
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(root)
    folder, image_dir = root / dataset, root / "images" / "mscoco" / "images" / "train2014"
    folder.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, image) in enumerate(images.items()):
        if isinstance(image, np.ndarray):
            Image.fromarray(image).save(image_dir / name)
        else:
            shutil.copyfile(image, image_dir / name)
        with Image.open(image_dir / name) as im:
            entries.append({"id": i, "file_name": name, "height": im.height, "width": im.width})
    ids = {e["file_name"]: e["id"] for e in entries}
    annotations, pickled, sent_id = [], [], 0
    for ref_id, ref in enumerate(refs):
        annotations.append(
            {"id": 100 + ref_id, "image_id": ids[ref["file_name"]], "segmentation": ref["segmentation"],
             "category_id": ref.get("category_id", 1), "iscrowd": 0}
        )  # fmt: skip
        sentences = []
        for text in ref["sentences"]:
            sentences.append({"sent": text, "raw": text, "tokens": text.split(), "sent_id": sent_id})
            sent_id += 1
        pickled.append(
            {"ref_id": ref_id, "ann_id": 100 + ref_id, "image_id": ids[ref["file_name"]],
             "split": ref["split"], "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
             "category_id": ref.get("category_id", 1), "file_name": ref["file_name"]}
        )  # fmt: skip
    instances = {"images": entries, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(pickled, protocol=2))
    return root


def write_davis_folder(
    root: Any,
    videos: dict[str, tuple[Any, Any]],
    expressions: list[tuple[str, int, str]],
    *,
    split: str = "val",
) -> Any:
    """Write a Ref-DAVIS17 folder (DAVIS 2017 layout, palette PNG annotations); returns ``root``.

    Args:
        root: the folder (created).
        videos: name → ``(frames (T, H, W, 3) uint8, object ids (T, H, W) uint8)``.
        expressions: ``(video, object id, expression)``, written to all four expression files
            (annotator 2's in Latin-1, as the release has them).
        split: the DAVIS split the videos are listed in.
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(root)
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0, 0, 128] * 252
    for name, (frames, ids) in videos.items():
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True, exist_ok=True)
        for t, (frame, objects) in enumerate(zip(frames, ids, strict=True)):
            Image.fromarray(frame).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95)
            png = Image.fromarray(np.asarray(objects, dtype=np.uint8), mode="P")
            png.putpalette(palette)
            png.save(root / "Annotations" / "480p" / name / f"{t:05d}.png")
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / f"{split}.txt").write_text("".join(f"{v}\n" for v in videos))
    text = root / "davis_text_annotations"
    text.mkdir(exist_ok=True)
    lines = "".join(f'{video} {obj} "{e}"\n' for video, obj, e in expressions)
    for name, encoding in (("annot1", "utf-8"), ("annot2", "latin-1")):
        for suffix in ("", "_full_video"):
            (text / f"Davis17_{name}{suffix}.txt").write_text(lines, encoding=encoding)
    return root


def labelme_examples(cache: Any = None) -> Any:
    """The examples folder of Debian's ``labelme-examples`` package, fetched once into a cache.

    The package ships PASCAL VOC photographs with instance polygons in COCO format and a 5-frame
    street video with per-frame polygons. It is fetched with ``apt-get download`` and unpacked with
    ``dpkg -x`` into ``cache`` (default ``~/.cache/attnlens/labelme-examples``).

    Raises:
        RuntimeError: apt or dpkg is missing, or the package could not be fetched (the reason).
    """
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    cache = Path(cache or Path.home() / ".cache" / "attnlens" / "labelme-examples")
    examples = cache / "usr" / "share" / "doc" / "labelme-examples" / "examples"
    if (examples / "instance_segmentation").exists():
        return examples
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: Debian's labelme-examples cannot be fetched here")
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(
            ["apt-get", "download", "labelme-examples"], cwd=tmp, capture_output=True, text=True, timeout=300
        )
        debs = list(Path(tmp).glob("labelme-examples_*.deb"))
        if got.returncode or not debs:
            raise RuntimeError(
                f"apt-get download labelme-examples failed: {(got.stderr or got.stdout).strip()[-300:]}"
            )
        partial = cache.with_name(cache.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(debs[0]), str(partial)], check=True, timeout=300)
        shutil.rmtree(cache, ignore_errors=True)
        partial.rename(cache)  # whole or not at all: an interrupted unpack is never taken for the package
    return examples


#: referring expressions written for the objects of labelme-examples' photographs: (COCO annotation id, text)
LABELME_EXPRESSIONS: dict[str, list[tuple[int, str]]] = {
    "2011_000003": [
        (0, "the man in the red jacket"),
        (1, "the man in green on the right"),
        (2, "the bottle"),
    ],
    "2011_000025": [(3, "the big red bus"), (4, "the green bus on the left"), (5, "the car on the right")],
    "2011_000006": [(9, "the chair"), (11, "the blue sofa"), (10, "the person at the top right")],
}
#: and for the objects of its street video: (object id, text); the truck is drawn as two polygons
LABELME_VIDEO_EXPRESSIONS = [(1, "the green truck behind the tree"), (2, "the red car on the right")]


def labelme_benchmarks(root: Any, examples: Any = None) -> dict[str, Any]:
    """RefCOCO- and Ref-DAVIS17-format folders of labelme-examples' photographs, with
    :data:`LABELME_EXPRESSIONS`; returns ``{"refcoco": root/refer, "ref-davis17": root/davis}``.

    RefCOCO's ``val`` holds the nine photograph expressions; Ref-DAVIS17's ``val`` the street video
    (1000 × 563, 5 frames) with its truck (object 1) and car (object 2).
    """
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image, ImageDraw

    examples = Path(examples or labelme_examples())
    coco_dir = examples / "instance_segmentation" / "data_dataset_coco"
    coco = json.loads((coco_dir / "annotations.json").read_text())
    by_id = {a["id"]: a for a in coco["annotations"]}
    images = {Path(im["file_name"]).stem: coco_dir / im["file_name"] for im in coco["images"]}
    refs = [
        {"file_name": f"{stem}.jpg", "segmentation": by_id[ann]["segmentation"], "sentences": [text],
         "split": "val", "category_id": by_id[ann]["category_id"]}
        for stem, objects in LABELME_EXPRESSIONS.items()
        for ann, text in objects
    ]  # fmt: skip
    root = Path(root)
    refer = write_refer_folder(root / "refer", {f"{s}.jpg": p for s, p in images.items()}, refs)
    video_dir = examples / "video_annotation" / "data_annotated"
    frames, ids = [], []
    for path in sorted(video_dir.glob("*.json")):
        shapes = json.loads(path.read_text())
        frame = np.asarray(Image.open(video_dir / shapes["imagePath"]).convert("RGB"))
        canvas = Image.new("L", (frame.shape[1], frame.shape[0]), 0)
        for shape in shapes["shapes"]:
            obj = {"track": 1, "car": 2}[shape["label"]]
            ImageDraw.Draw(canvas).polygon([tuple(p) for p in shape["points"]], fill=obj)
        frames.append(frame)
        ids.append(np.asarray(canvas))
    expressions = [("street", obj, text) for obj, text in LABELME_VIDEO_EXPRESSIONS]
    davis = write_davis_folder(root / "davis", {"street": (np.stack(frames), np.stack(ids))}, expressions)
    return {"refcoco": refer, "ref-davis17": davis}


# -- SD3/3.5, FLUX.2, Qwen-Image and Chroma: transformers and pipelines of diffusers' test configs ----------


def tiny_sd3(**config):
    from diffusers import SD3Transformer2DModel

    defaults = dict(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    torch.manual_seed(0)
    return SD3Transformer2DModel(**{**defaults, **config}).eval()


def tiny_flux2():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
    ).eval()


def tiny_qwen():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()


def tiny_chroma():
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    return ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=[4, 4, 8],
        approximator_num_channels=8,
        approximator_hidden_dim=16,
        approximator_layers=1,
    ).eval()


def _tiny_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()


def _tiny_t5_seeded(tokenizer):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def tiny_sd3_pipeline():
    """SD3 with 2 blocks, CLIP-L/G and T5 (16 tokens); 8 × 12 px images are an 8 × 12 token grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer(16)

    def clip(seed):
        torch.manual_seed(seed)
        config = CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(clip_tok), projection_dim=32,
            max_position_embeddings=77,
        )  # fmt: skip
        return CLIPTextModelWithProjection(config).eval()

    return StableDiffusion3Pipeline(
        transformer=tiny_sd3(patch_size=1),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(4),
        text_encoder=clip(0),
        tokenizer=clip_tok,
        text_encoder_2=clip(1),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_tiny_t5_seeded(t5_tok),
        tokenizer_3=t5_tok,
    )


def tiny_chroma_pipeline():
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    tok = tiny_t5_tokenizer(16)
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(1),
        text_encoder=_tiny_t5_seeded(tok),
        tokenizer=tok,
        transformer=tiny_chroma(),
    )


def tiny_qwen_pipeline():
    """Qwen-Image with a tiny Qwen2.5-VL text encoder (diffusers' test config) and a byte-level tokenizer."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = tiny_byte_level_tokenizer()
    torch.manual_seed(0)
    text = {
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rope_theta": 1000000.0,
        "vocab_size": len(tok),
        "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
    }
    vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16}
    ids = {
        "vision_start_token_id": len(tok) - 3,
        "vision_end_token_id": len(tok) - 2,
        "vision_token_id": len(tok) - 1,
    }
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, hidden_size=16, vocab_size=len(tok),
                              sliding_window=32, bos_token_id=0, eos_token_id=0, **ids)  # fmt: skip
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
        tokenizer=tok,
        transformer=tiny_qwen(),
    )


def tiny_flux2_klein_pipeline():
    """FLUX.2 [klein]: a tiny Qwen-3 text encoder over a chat template, 3 hidden layers stacked (48 wide)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = tiny_byte_level_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n"
    )
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    )
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=Qwen3ForCausalLM(config).eval(),
        tokenizer=tok,
        transformer=transformer.eval(),
    )


def tiny_hunyuan_pipeline(seed: int = 0):
    """A ``HunyuanVideoPipeline`` of tiny random parts: its VAE (8× spatial, 4× temporal), a 2-layer
    Llama over a byte-level tokenizer, CLIP, and a transformer of 1 dual- and 1 single-stream block."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    llama_tok, clip_tok = tiny_byte_level_tokenizer(), tiny_clip_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, scaling_factor=0.476986,
        spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=True,
    ).eval()  # fmt: skip
    llama = LlamaModel(
        LlamaConfig(vocab_size=len(llama_tok), hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                    pad_token_id=0)
    ).eval()  # fmt: skip
    clip = CLIPTextModel(
        CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=8, intermediate_size=37,
                       num_attention_heads=2, num_hidden_layers=2, vocab_size=len(clip_tok), projection_dim=8,
                       max_position_embeddings=77)
    ).eval()  # fmt: skip
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).eval()  # fmt: skip
    return HunyuanVideoPipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=llama, tokenizer=llama_tok, text_encoder_2=clip, tokenizer_2=clip_tok,
    )  # fmt: skip


def tiny_ltx_pipeline(seed: int = 0, max_sequence_length: int = 16):
    """An ``LTXPipeline`` of tiny random parts: its VAE (4× spatial and temporal), T5, and a transformer
    of 2 blocks (separate self- and cross-attention), 2 heads × 8."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    tokenizer = tiny_t5_tokenizer(max_sequence_length)
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False,
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()  # fmt: skip
    text_encoder = _tiny_t5(tokenizer, num_layers=1, num_heads=2)
    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=32,
    ).eval()  # fmt: skip
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer,
    )  # fmt: skip
