"""What a model adapter tells attnlens about one architecture family."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError

__all__ = [
    "AttentionLayer",
    "CallLayout",
    "Geometry",
    "ModelAdapter",
    "forward_arguments",
    "pack_2x2",
    "stream_layers",
]


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
        text_mask: ``(batch, key_text)`` bool, False where the model masks a text token out
            (padding); ``None`` when the model attends to every text token.
    """

    batch: int
    timestep: float
    seq_len: int
    text: torch.Tensor
    image: torch.Tensor
    grid: np.ndarray
    text_mask: torch.Tensor | None = None

    @classmethod
    def concatenated(
        cls,
        batch: int,
        timestep: float,
        n_text: int,
        grid: np.ndarray,
        *,
        text_first: bool = True,
        text_mask: torch.Tensor | None = None,
    ) -> CallLayout:
        """The layout of one joint sequence ``[text | image]`` (or ``[image | text]``).

        >>> layout = CallLayout.concatenated(1, 500.0, 2, np.zeros((3, 3), dtype=np.int64), text_first=False)
        >>> layout.text.tolist(), layout.image.tolist(), layout.seq_len
        ([3, 4], [0, 1, 2], 5)
        """
        n_image = len(grid)
        first, second = torch.arange(n_text), torch.arange(n_text, n_text + n_image)
        if not text_first:
            first, second = torch.arange(n_image, n_image + n_text), torch.arange(n_image)
        return cls(batch, timestep, n_text + n_image, first, second, grid, text_mask)

    def same_tokens(self, other: CallLayout) -> bool:
        """Whether two calls share token counts and image grid."""
        return (
            self.seq_len == other.seq_len
            and len(self.text) == len(other.text)
            and np.array_equal(self.grid, other.grid)
        )


@dataclass(frozen=True)
class Geometry:
    """How pixels become tokens in one pipeline: what the encode-and-noise methods need to size inputs.

    Attributes:
        pixels_per_token: side in pixels of one token's square (VAE factor × patch); inputs are
            resized to a multiple of it.
        frames_per_latent: input frames per latent frame (the VAE's temporal compression; 1 for
            images); a clip holds ``1 + k · frames_per_latent`` frames (the first is encoded alone).
        latents_per_token_frame: latent frames per token frame (CogVideoX 1.5 patches 2).
        default_side: the working side when a user gives none (the family's native resolution).
    """

    pixels_per_token: int
    frames_per_latent: int = 1
    latents_per_token_frame: int = 1
    default_side: int = 1024


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
    attention_arguments: ClassVar[dict[str, int]] = {
        "query": 0,
        "key": 1,
        "value": 2,  # value, dropout_p, is_causal, enable_gqa: read by interventions only
        "attn_mask": 3,
        "dropout_p": 4,
        "is_causal": 5,
        "scale": 6,
        "enable_gqa": 7,
    }

    def accepts(self, transformer: nn.Module) -> bool:
        return any(cls.__name__ in self.transformer_classes for cls in type(transformer).__mro__)

    def layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        """Attention layers in execution order."""
        raise NotImplementedError

    def layout(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallLayout:
        """Token layout of a forward called with ``args`` / ``kwargs``."""
        raise NotImplementedError

    def block_hidden(self, output: Any) -> torch.Tensor:
        """The joint ``(batch, seq, dim)`` hidden state of a block's output.

        Blocks that update the image/video tokens only (separate cross-attention: Wan, LTX)
        return ``(batch, n_image, dim)``; the text positions then get NaN norms.
        """
        raise NotImplementedError

    #: pipeline attributes ``(encoder, tokenizer)`` tried in order by :meth:`text_encoder`
    text_encoder_names: ClassVar[tuple[tuple[str, str], ...]] = (("text_encoder", "tokenizer"),)

    def text_encoder(self, pipeline: Any) -> tuple[nn.Module, Any] | None:
        """The text encoder whose tokens enter joint attention, and its tokenizer."""
        for encoder_name, tokenizer_name in self.text_encoder_names:
            encoder = getattr(pipeline, encoder_name, None)
            tokenizer = getattr(pipeline, tokenizer_name, None)
            if encoder is not None and tokenizer is not None:
                return encoder, tokenizer
        return None

    # -- optional refinements; the defaults describe FLUX-like models ----------------------

    #: whether ``F.scaled_dot_product_attention`` calls inside an attention module are
    #: intercepted (a ``TorchFunctionMode`` entered for the module's forward); for processors
    #: that call SDPA directly with ``(batch, heads, seq, head_dim)`` tensors
    intercept_sdpa: ClassVar[bool] = False
    #: names of consecutive forwards at one timestep when a pipeline runs classifier-free
    #: guidance as separate calls without ``cache_context`` (Chroma: ``("cond", "uncond")``)
    sequential_branches: ClassVar[tuple[str, ...]] = ()
    #: kept variables this adapter cannot provide (refused when the capture is created)
    unsupported_keeps: ClassVar[tuple[str, ...]] = ()

    def interceptions(self, transformer: nn.Module) -> tuple[str, ...]:
        """``"module:function"`` names to patch for ``transformer`` (default :attr:`attention_functions`)."""
        return self.attention_functions

    def call_tokens(
        self, layer: AttentionLayer, layout: CallLayout, n_query: int, n_key: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Joint-sequence positions of one call's queries ``(n_query,)`` and keys ``(n_key,)``.

        ``None`` (the default) means the call attends over the joint sequence itself. Layers
        that see part of it (SD3.5's image-only ``attn2``, separate cross-attention) return
        the positions, and what lies outside the call is stored as NaN.
        """
        return None

    def branches(
        self, pipeline: Any | None, layout: CallLayout, kwargs: dict[str, Any]
    ) -> tuple[str, ...] | None:
        """CFG branch of each batch row when one forward carries several (batched ``[uncond, cond]``).

        ``None`` (the default): every row belongs to the branch the hooks report.
        """
        return None

    def text_encoders(self, pipeline: Any) -> list[tuple[str, nn.Module, Any]]:
        """``(source, encoder, tokenizer)`` of every text encoder whose tokens enter attention."""
        found = self.text_encoder(pipeline)
        return [("text", *found)] if found is not None else []

    def text_labels(
        self, pipeline: Any, ids: dict[str, list[torch.Tensor]], prompts: list[str], layout: CallLayout
    ) -> list[Any] | None:
        """Token labels of the text positions of each sample, or ``None`` when they cannot be told.

        Args:
            pipeline: the pipeline being captured.
            ids: token ids each text encoder saw, by source, in call order; the first call of a
                source is the prompt (a negative prompt is encoded after it).
            prompts: the prompt strings the pipeline encoded (may be empty).
            layout: the forward's layout; labels are wanted for ``layout.batch`` rows (per branch).

        Returns:
            one :class:`~attnlens.text.TokenLabels` per sample, each of ``len(layout.text)``.
        """
        from ..text import label_tokens

        encoders = self.text_encoders(pipeline)
        if not encoders or not ids.get(encoders[0][0]):
            return None
        source, _, tokenizer = encoders[0]
        rows = _rows_for(ids[source][0], layout.batch)
        if rows is None or rows.shape[-1] != len(layout.text):
            return None
        texts = _prompts_for(prompts, layout.batch)
        return [label_tokens(tokenizer, row.tolist(), prompt=p) for row, p in zip(rows, texts, strict=True)]

    def dataset_attrs(self, transformer: nn.Module) -> dict[str, Any]:
        """Extra attributes this adapter adds to a captured Dataset (e.g. a positional-layout flag)."""
        return {}

    #: whether a sampler pass may feed rising timesteps (Mochi's inverted-sigma schedule goes
    #: 0 → 1000); a run then follows the direction its first two steps take, and only a move
    #: against it starts a new sample. Default: a rising timestep restarts the sampler.
    timesteps_may_rise: ClassVar[bool] = False

    def call_rows(self, layer: AttentionLayer, layout: CallLayout, call: int) -> slice | None:
        """Batch rows that attention call number ``call`` inside ``layer``'s module holds.

        The hooks number the attention-function calls of each module forward from 0 (calls
        nested inside one, like SDPA inside ``dispatch_attention_fn``, are part of it). The
        default keeps the first call, over every row, and ignores the rest (IP-adapter calls
        come second). ``None`` ignores a call; a partial slice (Mochi calls SDPA once per row)
        makes ``layout`` passed to :meth:`call_tokens` that of those rows.
        """
        return slice(None) if call == 0 else None

    # -- encode and noise: one forward on a real image or clip (RefAM), each family's own way ----------

    #: layers whose keys hold the text (a selector of :attr:`attnlens.CaptureSpec.layers`); ``None``: all
    text_layers: ClassVar[str | None] = None
    #: the text length the family's pipeline encodes by default (capped by its tokenizer's own limit)
    max_sequence_length: ClassVar[int] = 512

    def denoiser(self, pipeline: Any, t: float) -> nn.Module:
        """The transformer the pipeline would run at flow time ``t`` (Wan 2.2 A14B holds two)."""
        return pipeline.transformer

    def forwards_per_step(self, pipeline: Any, **options: Any) -> int:
        """Transformer rows per sample and denoising step when ``pipeline`` is called with ``options``.

        2 where classifier-free guidance runs (a second branch, or a doubled batch), else 1.
        Pipelines with ``true_cfg_scale`` (FLUX.1, Qwen-Image, HunyuanVideo) guide by it; a
        transformer that embeds the guidance scale (``guidance_embeds``) runs one branch for any
        ``guidance_scale``; other pipelines guide when ``guidance_scale`` exceeds 1. An option
        left out counts at the pipeline's default.

        >>> from attnlens.testing import tiny_flux_pipeline
        >>> ModelAdapter().forwards_per_step(tiny_flux_pipeline(), guidance_scale=3.5)
        1
        """
        if pipeline is None:
            return 1
        params = inspect.signature(pipeline.__call__).parameters

        def given(name: str) -> Any:
            value = options.get(name)
            if value is None and name in params:
                value = params[name].default
            return value

        if "true_cfg_scale" in params:
            scale = given("true_cfg_scale")
        elif getattr(getattr(pipeline.transformer, "config", None), "guidance_embeds", False):
            return 1
        else:
            scale = given("guidance_scale")
        return 2 if isinstance(scale, int | float) and scale > 1 else 1

    def geometry(self, pipeline: Any) -> Geometry:
        """Pixels per token, frames per latent frame and the native size of ``pipeline``."""
        raise UnsupportedModelError(f"attnlens cannot encode images for the {self.family} family")

    def token_counts(
        self, pipeline: Any, *, height: int, width: int, frames: int = 1, text: int
    ) -> tuple[int, int]:
        """``(text, image)`` tokens of one forward of ``pipeline`` over a ``height × width`` pixel image
        (``frames`` frames of video) whose prompt is encoded to ``text`` tokens, by its :meth:`geometry`;
        :func:`attnlens.store.plan` sizes a capture from it. Sizes are rounded down to whole tokens,
        as pipelines do."""
        geometry = self.geometry(pipeline)
        side = geometry.pixels_per_token
        latent_frames = (frames - 1) // geometry.frames_per_latent + 1  # the first frame is encoded alone
        token_frames = -(-latent_frames // geometry.latents_per_token_frame)
        return text, token_frames * (height // side) * (width // side)

    def encode_prompt(
        self, pipeline: Any, prompt: str, *, max_sequence_length: int | None = None, guidance: float = 3.5
    ) -> tuple[dict[str, Any], Any]:
        """The transformer's text inputs for ``prompt``, and the labels of its text positions.

        The pipeline's own ``encode_prompt`` runs (no classifier-free guidance); the token ids each
        text encoder sees are recorded and labelled by :meth:`text_labels`, so the labels line up with
        the text keys of attention whatever template or second encoder the family adds.

        Args:
            pipeline: the family's diffusers pipeline.
            prompt: the prompt.
            max_sequence_length: text tokens (``None``: :attr:`max_sequence_length`, or the
                tokenizer's limit when smaller).
            guidance: the embedded guidance scale of guidance-distilled models (FLUX.1 [dev],
                HunyuanVideo); ignored by the others.

        Returns:
            ``(keyword arguments of the transformer's forward, TokenLabels of its text keys)``.
        """
        with _recording_ids(self.text_encoders(pipeline)) as ids:
            kwargs = self.prompt_inputs(
                pipeline, prompt, self._text_length(pipeline, max_sequence_length), guidance
            )
        n_text = kwargs["encoder_hidden_states"].shape[1]
        layout = CallLayout.concatenated(1, 0.0, n_text, np.zeros((0, 3), dtype=np.int64))
        labels = self.text_labels(pipeline, ids, [prompt], layout)
        if not labels:
            raise UnsupportedModelError(
                f"attnlens cannot tell which tokens of {prompt!r} the {self.family} text keys hold"
            )
        return kwargs, labels[0]

    def prompt_inputs(
        self, pipeline: Any, prompt: str, max_sequence_length: int, guidance: float
    ) -> dict[str, Any]:
        """The family's text keyword arguments of a transformer forward (see :meth:`encode_prompt`)."""
        raise UnsupportedModelError(f"attnlens cannot encode prompts for the {self.family} family")

    def encode_pixels(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(1, 3, H, W)`` (a clip: ``(1, 3, T, H, W)``) in ``[-1, 1]`` → the latents the
        family's sampler starts from: encoded by the VAE (its mode), normalised as the pipeline
        normalises them, unpacked (``(1, C, h, w)`` or ``(1, C, F, h, w)``)."""
        raise UnsupportedModelError(f"attnlens cannot encode images for the {self.family} family")

    def noised_inputs(
        self, pipeline: Any, latents: torch.Tensor, noise: torch.Tensor, t: float
    ) -> dict[str, Any]:
        """The transformer's latent inputs (``hidden_states``, ``timestep``, positions) at flow time
        ``t``: ``x_t = (1 − t)·latents + t·noise`` (a DDPM family: its scheduler's ``add_noise``),
        packed into tokens as the pipeline packs them."""
        raise UnsupportedModelError(f"attnlens cannot noise latents for the {self.family} family")

    def forward_inputs(self, pipeline: Any, latent: dict[str, Any], text: dict[str, Any]) -> dict[str, Any]:
        """One forward's keyword arguments from :meth:`noised_inputs` and :meth:`encode_prompt`'s
        (families whose masks span text and image, like Chroma, join them here)."""
        return {**latent, **text}

    def _text_length(self, pipeline: Any, requested: int | None) -> int:
        if requested is not None:
            return int(requested)
        encoders = self.text_encoders(pipeline)
        limit = getattr(encoders[-1][2], "model_max_length", None) if encoders else None
        limit = int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else self.max_sequence_length
        return min(self.max_sequence_length, limit)

    def transformers(self, transformer: nn.Module, pipeline: Any | None) -> list[tuple[str, nn.Module]]:
        """Every transformer a capture of ``pipeline`` hooks, named; the first is ``transformer``.

        Pipelines that switch transformers between steps (Wan 2.2: ``transformer`` then
        ``transformer_2``) list each; they share layer names, and the ``transformer``
        coordinate of each step tells which one ran.
        """
        return [("transformer", transformer)]


class _recording_ids:
    """Records the ``input_ids`` each text encoder is called with, by source, while it is entered."""

    def __init__(self, encoders: list[tuple[str, nn.Module, Any]]) -> None:
        self.encoders, self.ids, self.handles = encoders, {}, []

    def __enter__(self) -> dict[str, list[torch.Tensor]]:
        for source, encoder, _ in self.encoders:

            def record(module: nn.Module, args: tuple, kwargs: dict, source: str = source) -> None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                if isinstance(ids, torch.Tensor):
                    self.ids.setdefault(source, []).append(ids.detach().cpu())

            self.handles.append(encoder.register_forward_pre_hook(record, with_kwargs=True))
        return self.ids

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` latents → ``(B, h/2 · w/2, 4C)`` tokens of 2 × 2 patches, row-major, each
    token's channels ordered ``(c, dy, dx)``: the packing of FLUX.1, Chroma and Qwen-Image.

    >>> pack_2x2(torch.arange(16.0).view(1, 1, 4, 4))[0, :2].tolist()
    [[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]
    """
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def flow_noised(latents: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """``(1 − t)·latents + t·noise``: a rectified-flow sample at flow time ``t``."""
    return (1 - t) * latents + t * noise.to(latents.device, latents.dtype)


def vae_mode(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The mode of a diffusers VAE's latent distribution for ``pixels`` (on the VAE's device and dtype)."""
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()


def scaled_latents(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``(mode − shift_factor) · scaling_factor``: latents as FLUX, SD3, CogVideoX and HunyuanVideo
    pipelines normalise them (a VAE without a ``shift_factor`` shifts by 0)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (vae_mode(vae, pixels) - shift) * vae.config.scaling_factor


def _rows_for(ids: torch.Tensor, batch: int) -> torch.Tensor | None:
    """``(batch, seq)`` token ids for ``batch`` samples from ``(prompts, seq)`` ids (repeated per image)."""
    ids = ids if ids.ndim == 2 else ids.unsqueeze(0)
    if batch % ids.shape[0]:
        return None
    return ids.repeat_interleave(batch // ids.shape[0], dim=0)


def _prompts_for(prompts: list[str], batch: int) -> list[str | None]:
    """The prompt string of each of ``batch`` samples, ``None`` where unknown."""
    if not prompts or batch % len(prompts):
        return [None] * batch
    return [prompts[i // (batch // len(prompts))] for i in range(batch)]


REQUIRED = ("hidden_states", "encoder_hidden_states", "timestep")


def forward_arguments(
    transformer: nn.Module, args: tuple, kwargs: dict[str, Any], required: tuple[str, ...] = REQUIRED
) -> dict[str, Any]:
    """A forward's arguments by name, positional ones bound by the transformer's signature.

    Names the call did not pass are absent (``.get`` gives ``None``); a missing or ``None``
    ``required`` argument raises ``TypeError`` naming what the model needs.
    """
    given = _signature(type(transformer)).bind_partial(*args, **kwargs).arguments
    if any(given.get(name) is None for name in required):
        *rest, last = required
        raise TypeError(f"{type(transformer).__name__} needs {', '.join(rest)} and {last}")
    return given


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward).replace(
        parameters=list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
    )


def stream_layers(transformer: nn.Module) -> list[AttentionLayer]:
    """``double.N`` then ``single.N`` layers of a double-/single-stream transformer (FLUX-like).

    The blocks are ``transformer_blocks`` and ``single_transformer_blocks``, each with ``.attn``.
    """
    return [
        AttentionLayer(f"{kind}.{i}", kind, block.attn, block, block.attn.heads)
        for kind, blocks in (
            ("double", transformer.transformer_blocks),
            ("single", transformer.single_transformer_blocks),
        )
        for i, block in enumerate(blocks)
    ]
