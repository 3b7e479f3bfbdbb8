"""RefAM for images: a referring expression's attention in one noised forward, turned into a mask.

:func:`segment` runs DESIGN.md §7 on one image, every step a named option of
:class:`RefamOptions` with the default given there:

1. **parse** the expression (:func:`~attnlens.refam.parse`): head noun, target phrase, spatial words;
2. **prompt**: the expression (optionally inside ``caption``), then the appended magnets
   (:func:`~attnlens.refam.build_prompt`);
3. **encode** the image at the working resolution (FLUX: the VAE, then FLUX's 2×2 latent packing;
   the embedded :class:`~attnlens.zoo.ShapesPipeline`: its pixel patches), noise it to flow time
   ``t`` (``x_t = (1 − t)·x + t·ε``) and run one forward per ``forwards`` (no denoising loop);
4. **capture** ``cross`` (image queries → text keys) on ``layers`` with :func:`attnlens.capture`.
   **GAS handling**: the global attention sinks are found with
   :func:`~attnlens.analysis.find_sinks` on a probe forward (``sinks="auto"``) or chosen by
   ``sinks``; ``gas="suppress"`` drops their columns and renormalises inside the model
   (:func:`attnlens.suppress`), ``gas="redirect"`` moves their mass onto the magnets
   (:func:`attnlens.redirect`), ``gas="none"`` leaves them. Where the adapter cannot intervene,
   the sink text columns are dropped from the captured rows and each row is renormalised instead.
   With ``gas_spare_targets`` (the default), a key the automatic finder names that is one of the
   target tokens is spared: GAS handling never suppresses or redirects the words being segmented;
5. **aggregate** the target tokens' maps (summed over tokens: the mass the target words get),
   averaged over heads, layers and forwards. With ``text_share``, each image query's row is first
   divided by its sum over the text keys left after the GAS column filtering (per layer and
   forward), so that the maps are the words' shares of the query's attention to the prompt (the
   magnets' maps alike). **Magnet filtering** keeps stop words and magnets out of that sum;
   switched off, their maps join it. A soft **spatial prior** multiplies the map: a linear ramp
   from 1 at the named side to 0 at ``prior_extent`` of the image, lifted to
   ``prior_floor + (1 − prior_floor) · ramp`` so that no region is ruled out;
6. **points**: the ``n_points`` highest local maxima of the heatmap (positives) and, with
   ``negatives > 0``, the strongest peaks where the magnets own more attention than the target;
   or, with ``prompts="grid"``, the segmenter is prompted at the centre of each of the hottest
   token cells, one at a time, and the cell whose mask holds the highest mean heat is the point;
   **refinement**: Otsu's threshold, then the largest connected component (``refiner="threshold"``);
   the model-free point-prompted :func:`~attnlens.refam.refine.region_segmenter`
   (``refiner="region"``, for flat-coloured scenes); or, with a segmenter, SAM or SAM2
   (``transformers``' ``SamModel``, ``Sam2Model``) prompted with the points, its best-scoring mask
   (:mod:`attnlens.refam.refine`).

The heatmap and mask come back at the input image's size, whatever its size and mode. Steps 2–6
are this module's functions, shared with :func:`~attnlens.refam.segment_video`, which runs them
per video frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xarray as xr
from PIL import Image

from ..errors import HookError, UnsupportedModelError
from ..text import TokenLabels
from .errors import RefamError, SegmenterMismatchError
from .parse import ParsedExpression, parse
from .prompts import DEFAULT_COLOUR, DEFAULT_MAGNETS, RefamPrompt, build_prompt
from .refine import REFINERS, best_proposal, image_segmenter, refine

__all__ = ["GAS_CHOICES", "RefamOptions", "RefamResult", "segment"]

GAS_CHOICES = ("suppress", "redirect", "none")
_COMPONENTS = ("largest", "peak")
_PROMPTS = ("peaks", "grid")
#: at most this many of the hottest token cells prompt the segmenter with ``prompts="grid"``: every
#: cell of the embedded model's 8 × 8 grid, the hottest 64 of FLUX's 64 × 64 (SAM runs once per prompt)
GRID_PROMPTS = 64


@dataclass(frozen=True)
class RefamOptions:
    """Every knob of :func:`segment`, with its default (REFAM.md gives the starting choices).

    Attributes:
        caption: a caption around the expression (``"a photo of {expression}"``); ``None``: the
            expression alone.
        magnets: appended stop words, ``("the", "of", "and")``: three (REFAM.md sweeps 1–10)
            that every tokenizer of attnlens' models knows.
        colour: the appended colour word, ``"white"`` (a spare one when the expression names it).
        append_magnets: append the magnets (``False``: the "no appended magnets" ablation).
        filter_magnets: keep stop words and magnets out of the aggregated maps (``False``: the
            "no magnet filtering" ablation: their maps join the target's).
        targets: ``"head"`` (the head noun, as Ref-Diff) or ``"phrase"`` (its content words).
        parser: ``"auto"``, ``"rules"`` or ``"spacy"`` (see :func:`~attnlens.refam.parse`).
        t: flow time of the single noised forward, 0.5 (the embedded model's grounding default;
            REFAM.md sweeps 0.1–0.7).
        forwards: forwards averaged, each with its own noise, 1.
        seed: seed of the noise; the same seed gives the same mask.
        resolution: working side in pixels (the image, or each frame, is resized to a square);
            ``None``: 1024 for FLUX (its 64 × 64 token grid), the model's own size for the
            embedded ShapesPipeline, 480 for the video DiTs.
        max_sequence_length: the text encoder's length (FLUX's and Wan's T5: ``None`` is
            ``min(512, tokenizer.model_max_length)``; Mochi's: ``min(256, …)``; CogVideoX's is
            its transformer's ``max_text_seq_length``).
        guidance: FLUX guidance embedding for guidance-distilled models, 3.5 (the pipeline's).
        layers: captured layers, as :attr:`attnlens.CaptureSpec.layers`; ``None``: all (Wan: its
            cross-attention layers, the only ones with text keys).
        heads: head reduction of the capture, ``"mean"`` (Ref-Diff, DAAM) or ``"max"``.
        text_share: divide each image query's captured image→text row by its sum over the text
            keys of the prompt (every captured text column left after the GAS column filtering)
            before the target tokens' maps are summed, ``False``. The maps then hold each word's
            *share* of the query's attention to the prompt rather than its raw probability. In
            small models the raw image→text probabilities are largest where image tokens read
            the text most, often the background, so the raw target map can peak there; the
            share compares the words against each other at each image position. The magnets'
            map gets the same treatment, so that the two stay comparable for negative points.
            The share is taken per layer and per forward, before their mean; the capture has
            already reduced the heads (``heads``), so it is the share of the head-mean (or
            head-max) row, not the mean of per-head shares. Pure cross-attention layers (Wan's
            ``cross.N``) already attend to text alone: there it changes nothing.
        gas: ``"suppress"`` (default), ``"redirect"`` or ``"none"`` (the "no GAS handling" ablation).
        sinks: which keys are GAS: ``"auto"`` (:func:`~attnlens.analysis.find_sinks` on a probe
            forward; the layers where they are found are intervened in), or a
            :class:`~attnlens.interventions.TokenSelector` field mapping (``{"kind": "pad"}``) or
            joint-sequence positions (every layer is intervened in; taken as given, nothing is
            spared).
        gas_spare_targets: never handle a target token as a GAS, ``True``: a key that the
            automatic finder (``sinks="auto"``) names and that is one of the target tokens (the
            tokens whose maps step 5 sums) is removed from the sinks that are suppressed or
            redirected, and from the columns that the post-hoc filter drops; ``info["spared_sinks"]``
            lists them. ``False``: the ablation, the finder's keys as found.
        spatial_prior: apply the spatial prior of the expression's spatial words.
        prior_extent: share of the image over which the prior ramps from 1 to 0, 2/3 (Ref-Diff).
        prior_floor: the prior's least value, in ``[0, 1)``, 0.1: the prior is
            ``floor + (1 − floor) · ramp``, so that an object on the "wrong" side of a spatial
            word can still win when its attention is much stronger (0: the hard-zero ramp).
        n_points: positive points, 1 (the argmax peak), per image or frame.
        negatives: negative points from magnet-owned regions, 0.
        prompts: ``"peaks"`` (the heatmap's peaks prompt the segmenter, as the paper does) or
            ``"grid"``: the segmenter is prompted at each token cell's centre alone (the
            :data:`GRID_PROMPTS` hottest cells) and the cell whose mask has the highest mean heat
            becomes the one positive point
            (:func:`~attnlens.refam.refine.best_proposal`); it needs a point-prompted segmenter
            (``refiner="region"`` or ``segmenter=``). The heatmap's hottest pixel can lie just
            off the object its heat surrounds; a mask's mean heat cannot.
        refine: refine the thresholded heatmap (``False``: the "no refinement" ablation: Otsu's
            threshold of the heatmap, nothing else, also when a segmenter is given).
        component: which connected component the threshold refiner keeps: ``"largest"`` or
            ``"peak"`` (the one holding the strongest positive point).
        refiner: the refiner when no ``segmenter`` is given: ``"threshold"`` (Otsu's threshold
            and one component) or ``"region"`` (:func:`~attnlens.refam.refine.region_segmenter`,
            a model-free point-prompted segmenter for flat-coloured scenes such as the embedded
            world's; SAM's stand-in where no SAM weights are at hand).
    """

    caption: str | None = None
    magnets: tuple[str, ...] = DEFAULT_MAGNETS
    colour: str | None = DEFAULT_COLOUR
    append_magnets: bool = True
    filter_magnets: bool = True
    targets: str = "head"
    parser: str = "auto"
    t: float = 0.5
    forwards: int = 1
    seed: int = 0
    resolution: int | None = None
    max_sequence_length: int | None = None
    guidance: float = 3.5
    layers: Any = None
    heads: str = "mean"
    text_share: bool = False
    gas: str = "suppress"
    sinks: Any = "auto"
    gas_spare_targets: bool = True
    spatial_prior: bool = True
    prior_extent: float = 2 / 3
    prior_floor: float = 0.1
    n_points: int = 1
    negatives: int = 0
    prompts: str = "peaks"
    refine: bool = True
    component: str = "largest"
    refiner: str = "threshold"

    def __post_init__(self) -> None:
        object.__setattr__(self, "magnets", tuple(str(m) for m in self.magnets))
        if self.gas not in GAS_CHOICES:
            raise ValueError(f"unknown gas={self.gas!r}: use one of {', '.join(GAS_CHOICES)}")
        if self.component not in _COMPONENTS:
            raise ValueError(f"unknown component={self.component!r}: use one of {', '.join(_COMPONENTS)}")
        if self.prompts not in _PROMPTS:
            raise ValueError(f"unknown prompts={self.prompts!r}: use one of {', '.join(_PROMPTS)}")
        if self.refiner not in REFINERS:
            raise ValueError(f"unknown refiner={self.refiner!r}: use one of {', '.join(REFINERS)}")
        if self.heads not in ("mean", "max"):
            raise ValueError(f"unknown heads={self.heads!r}: use 'mean' or 'max'")
        if not 0.0 <= float(self.t) <= 1.0:
            raise ValueError(f"t={self.t} lies outside the flow time range [0, 1]")
        if not 0.0 < float(self.prior_extent) <= 1.0:
            raise ValueError(f"prior_extent={self.prior_extent} must lie in (0, 1]")
        _check_floor(self.prior_floor, "prior_floor")
        for name in ("forwards", "n_points"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if int(self.negatives) < 0:
            raise ValueError(f"negatives must be 0 or more; got {self.negatives}")


def _check_floor(floor: float, name: str = "floor") -> None:
    if not 0.0 <= float(floor) < 1.0:
        raise ValueError(
            f"{name}={floor} must lie in [0, 1): the spatial prior's least value (0: a hard zero on the "
            "far side; 1 would switch the prior off: use spatial_prior=False)"
        )


@dataclass
class RefamResult:
    """What :func:`segment` found, and what lies behind it.

    Attributes:
        mask: ``(H, W)`` bool at the input image's size.
        heatmap: ``(H, W)`` float32 in ``[0, 1]`` at the input size (the prior applied).
        points: ``(n, 2)`` float ``(x, y)`` pixel coordinates in the input image.
        point_labels: ``(n,)`` int, 1 for a positive point, 0 for a negative one.
        maps: the intermediate maps on the token grid: ``target`` ``(layer, y, x)`` (the target
            words' attention per layer), ``magnet`` ``(y, x)`` (the magnets'), ``aggregate``
            ``(y, x)`` (before the prior), ``prior`` ``(y, x)``, ``heatmap`` ``(y, x)``.
        prompt: the :class:`~attnlens.refam.RefamPrompt` used.
        expression: the :class:`~attnlens.refam.ParsedExpression`.
        options: the :class:`RefamOptions` as a dict.
        info: what actually ran: ``gas_applied`` (``suppress``/``redirect``/``filter``/``none``),
            ``sinks`` (joint positions), ``sink_layers``, ``spared_sinks`` (the joint positions of
            target tokens the GAS finder named and ``gas_spare_targets`` spared), ``refiner``,
            ``resolution``, ``grid``.
    """

    mask: np.ndarray
    heatmap: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray
    maps: xr.Dataset
    prompt: RefamPrompt
    expression: ParsedExpression
    options: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


# -- input images ------------------------------------------------------------------------------------


def _as_rgb(image: Any) -> np.ndarray:
    """A PIL image or array (``(H, W)``, ``(H, W, 1|3|4)``, uint8 or float in [0, 1]) → ``(H, W, 3)`` uint8.

    Arrays are channels-last (a ``(3, H, W)`` tensor is read as a 3-row image with W channels and refused).

    RGBA drops its alpha channel (the colours are what the model sees).
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or min(arr.shape[:2]) < 1:
        raise RefamError(
            f"an image is (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with H, W ≥ 1, or a PIL image; "
            f"got an array of shape {arr.shape}"
        )
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise RefamError("the image holds NaN or infinite values")
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0  # floats in [0, 1], or already 0–255
        arr = np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.array(arr[..., :3])  # a writable copy: torch refuses read-only buffers


def _resized(rgb: np.ndarray, side: int) -> np.ndarray:
    if rgb.shape[:2] == (side, side):
        return rgb
    return np.array(Image.fromarray(rgb).resize((side, side), Image.Resampling.BICUBIC))


# -- models ------------------------------------------------------------------------------------------


class _Backend:
    """One model family: its tokenizer, working size, and one noised forward.

    ``layers`` are the layers captured when ``options.layers`` is ``None`` and ``gas_layers`` those
    searched for GAS (``None``: all). ``forward`` takes what the family encodes: an image
    ``(side, side, 3)`` uint8 here, a clip ``(frames, side, side, 3)`` for the video DiTs.
    """

    transformer: torch.nn.Module
    tokenizer: Any
    max_length: int
    side: int
    layers: Any = None
    gas_layers: Any = None

    def forward(self, pixels: np.ndarray, prompt: RefamPrompt, t: float, seed: int) -> None:
        raise NotImplementedError


class _ShapesBackend(_Backend):
    def __init__(self, pipe: Any, options: RefamOptions) -> None:
        size = pipe.config.image_size
        if options.resolution not in (None, size):
            raise RefamError(
                f"the ShapesPipeline works at {size} × {size} pixels only; leave resolution=None"
            )
        self.pipe, self.transformer, self.tokenizer = pipe, pipe.transformer, pipe.tokenizer
        self.max_length, self.side = pipe.config.max_length, size

    @torch.no_grad()
    def forward(self, rgb: np.ndarray, prompt: RefamPrompt, t: float, seed: int) -> None:
        pipe = self.pipe
        x_t = pipe.noised_tokens(rgb[None], t, generator=torch.Generator().manual_seed(seed))
        text = pipe.text_encoder(torch.tensor([prompt.input_ids], device=pipe.device))
        pipe.velocity(x_t, torch.full((1,), float(t), device=pipe.device), text)


class _PipelineBackend(_Backend):
    """A diffusers pipeline of a family whose adapter encodes and noises (DESIGN.md §3).

    Images are ``(side, side, 3)`` uint8, clips ``(T, side, side, 3)``; the adapter's
    :meth:`~attnlens.models.base.ModelAdapter.encode_pixels` and ``noised_inputs`` turn them into
    the transformer's inputs, and its ``encode_prompt`` the prompt into text inputs and the labels
    of the text keys. Encodings are cached per pixels and prompt: the GAS probe and several
    forwards encode once. The noise is drawn on the CPU from ``seed``, so that a seed gives the
    same noise on any device.
    """

    def __init__(self, pipe: Any, options: RefamOptions) -> None:
        from ..models.registry import resolve

        self.adapter, _, self.pipe = resolve(pipe)
        self.options, self.max_length = options, 0
        if getattr(pipe, "vae", None) is None:
            raise UnsupportedModelError(
                f"RefAM encodes images with the {type(pipe).__name__}'s VAE; it has none"
            )
        geometry = self.adapter.geometry(pipe)
        step = geometry.pixels_per_token
        self.temporal, self.patch_t = geometry.frames_per_latent, geometry.latents_per_token_frame
        self.side = max(step, round((options.resolution or geometry.default_side) / step) * step)
        self.transformer = self.adapter.denoiser(pipe, options.t)
        self.layers = self.gas_layers = self.adapter.text_layers
        self._cache: dict[str, tuple[Any, Any]] = {}

    def tokenizer(self, text: str) -> tuple[list[int], TokenLabels]:
        """The pipeline's encoding of ``text``: no ids of one tokenizer, the labels of the text keys."""
        return [], self._text(text)[1]

    def _text(self, text: str) -> tuple[dict[str, Any], TokenLabels]:
        def make() -> tuple[dict[str, Any], TokenLabels]:
            return self.adapter.encode_prompt(
                self.pipe,
                text,
                max_sequence_length=self.options.max_sequence_length,
                guidance=self.options.guidance,
            )

        return self._cached("text", text, make)

    def _cached(self, key: str, ref: Any, make: Any) -> Any:
        hit = self._cache.get(key)
        if hit is None or hit[0] is not ref:
            hit = (ref, make())
            self._cache[key] = hit
        return hit[1]

    @torch.no_grad()
    def latents(self, pixels: np.ndarray) -> torch.Tensor:
        """``(side, side, 3)`` or ``(T, side, side, 3)`` uint8 → the family's latents, cached."""

        def make() -> torch.Tensor:
            x = torch.tensor(pixels, dtype=torch.float32) / 127.5 - 1
            x = x.permute(2, 0, 1)[None] if x.ndim == 3 else x.permute(3, 0, 1, 2)[None]
            z = self.adapter.encode_pixels(self.pipe, x)
            if z.ndim == 5:
                expected = (len(pixels) - 1) // self.temporal + 1
                if z.shape[2] != expected:
                    raise RefamError(
                        f"the VAE encoded {len(pixels)} frames into {z.shape[2]} latent frames, not the "
                        f"{expected} that a temporal compression of {self.temporal} gives"
                    )
                extra = -z.shape[2] % self.patch_t  # CogVideoX 1.5 patches 2 latent frames: repeat the last
                if extra:
                    z = torch.cat([z, z[:, :, -1:].expand(-1, -1, extra, -1, -1)], dim=2)
            return z

        return self._cached("latents", pixels, make)

    @torch.no_grad()
    def forward(self, pixels: np.ndarray, prompt: RefamPrompt, t: float, seed: int) -> None:
        latents = self.latents(pixels)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        inputs = self.adapter.noised_inputs(self.pipe, latents, noise, t)
        inputs = self.adapter.forward_inputs(self.pipe, inputs, self._text(prompt.text)[0])
        self.transformer(**inputs, return_dict=False)


def _backend(model: Any, options: RefamOptions) -> _Backend:
    """The embedded ShapesPipeline, or a diffusers pipeline of any family whose adapter encodes images."""
    from ..zoo.shapes import ShapesPipeline

    model = _loaded(model)
    if isinstance(model, ShapesPipeline):
        return _ShapesBackend(model, options)
    if not isinstance(getattr(model, "transformer", None), torch.nn.Module):
        raise UnsupportedModelError(
            "RefAM takes a diffusers pipeline of an image family (FLUX.1, FLUX.2, SD3/3.5, Qwen-Image, "
            "Chroma) or, for videos, a video family (Wan, CogVideoX, Mochi, HunyuanVideo, LTX), an attnlens "
            f"ShapesPipeline or a zoo model name; got {type(model).__name__}"
        )
    return _PipelineBackend(model, options)


# -- steps -------------------------------------------------------------------------------------------


def _selector(sinks: Any) -> dict[str, Any]:
    if isinstance(sinks, dict):
        return dict(sinks)
    if hasattr(sinks, "describe"):  # a TokenSelector
        return {name: getattr(sinks, name) for name in ("tokens", "kind", "word", "positions")}
    values = list(sinks)
    if not all(isinstance(v, int | np.integer) for v in values):
        raise ValueError(f"sinks is 'auto', a TokenSelector mapping or joint positions; got {sinks!r}")
    return {"positions": [int(v) for v in values]}


def _text_positions(ds: xr.Dataset) -> np.ndarray:
    """Joint positions of the text tokens of a capture (FLUX, Wan, CogVideoX: first; Mochi: last)."""
    return np.flatnonzero(np.asarray(ds["key_kind"].values[0]) != "image")


def _find_gas(backend: _Backend, pixels: np.ndarray, prompt: RefamPrompt, options: RefamOptions) -> tuple:
    """GAS of a probe forward: ``(joint positions of the GAS keys, their layers, text joint positions)``."""
    from .. import capture
    from ..analysis import find_sinks

    with capture(
        backend.transformer, keep="key_mass", layers=backend.gas_layers, labels=[prompt.labels]
    ) as cap:
        backend.forward(pixels, prompt, options.t, options.seed)
    ds = cap.result
    gas = find_sinks(ds)["gas"].reduce(np.any, dim=("sample", "step")).values  # (layer, key)
    keys = np.asarray(ds["key"].values)
    layers = [str(n) for n, hit in zip(ds["layer"].values, gas.any(axis=1), strict=True) if hit]
    return [int(k) for k in keys[gas.any(axis=0)]], layers, _text_positions(ds)


def _intervention(
    backend: _Backend, pixels: np.ndarray, prompt: RefamPrompt, options: RefamOptions, info: dict[str, Any]
) -> Any:
    """The :func:`attnlens.suppress` / :func:`attnlens.redirect` of ``options.gas``, or ``None``."""
    from .. import redirect, suppress

    if options.gas == "none":
        return None
    if options.sinks == "auto":
        positions, layers, text = _find_gas(backend, pixels, prompt, options)
        info["sink_layers"] = layers
        if options.gas_spare_targets:  # the words being segmented are never handled as sinks
            targets = {int(p) for p in np.asarray(text)[prompt.target]}
            info["spared_sinks"] = [p for p in positions if p in targets]
            positions = [p for p in positions if p not in targets]
        if options.gas == "redirect":
            magnet_joint = {int(p) for p in text[prompt.magnet]}
            positions = [p for p in positions if p not in magnet_joint]  # the receivers cannot also give
        info["sinks"] = positions
        if not positions:
            return None
        select: dict[str, Any] = {"positions": positions}
        layer_sel: Any = layers
    else:
        select, layer_sel = _selector(options.sinks), None
        info["sinks"] = select
    if options.gas == "suppress":
        return suppress(**select, layers=layer_sel)
    onto = {"kind": "magnet"} if len(prompt.magnet) else {"kind": "stop"}
    kinds = set(prompt.labels.token_kind.tolist())
    if onto["kind"] not in kinds:
        raise RefamError(
            "gas='redirect' moves the sinks' attention onto the magnets, and this prompt has neither "
            "magnets nor stop words: append magnets or use gas='suppress'"
        )
    return redirect(**select, onto=onto, layers=layer_sel)


def _capture_cross(
    backend: _Backend, pixels: np.ndarray, prompt: RefamPrompt, options: RefamOptions, intervene: Any
) -> tuple[np.ndarray, np.ndarray, list[str], bool, np.ndarray]:
    """``(cross, grid, layer names, intervened, text joint positions)`` averaged over forwards.

    ``cross`` is ``(layer, query, key_text)``, 0 where a key is not attended (Mochi's padding);
    ``grid`` the ``(frame, y, x)`` of each query, ``(query, 3)``. Layers without image→text
    attention (Wan's self-attention) are left out. With ``options.text_share`` each forward's rows
    are shares of the text keys (:func:`_text_share`) before the forwards are averaged.
    """
    from .. import capture

    layers = options.layers if options.layers is not None else backend.layers
    total, intervened = None, intervene is not None
    select = intervene.select if intervene is not None else None
    for i in range(options.forwards):
        kwargs = dict(keep="cross", layers=layers, heads=options.heads, labels=[prompt.labels])
        cap = None
        if intervene is not None:
            try:
                with capture(backend.transformer, intervene=intervene, **kwargs) as cap:
                    backend.forward(pixels, prompt, options.t, options.seed + i)
            except HookError:  # a model the capture cannot intervene in: filter the sink columns instead
                intervened, intervene, cap = False, None, None
        if cap is None:
            with capture(backend.transformer, **kwargs) as cap:
                backend.forward(pixels, prompt, options.t, options.seed + i)
        ds = cap.result
        cross = ds["cross"].isel(sample=0, step=0, head=0).transpose("layer", "query", "key_text").values
        cross = cross.astype(np.float64)
        if options.text_share:  # per layer and forward, over the text keys the sink filter leaves
            drop = (
                None
                if intervened or select is None
                else _sink_columns(select, prompt.labels, cross.shape[-1], _text_positions(ds))
            )
            cross = _text_share(cross, drop)
        total = cross if total is None else total + cross
    names = np.array([str(n) for n in ds["layer"].values])
    kept = np.isfinite(total).any(axis=(1, 2))
    if not kept.any():
        raise RefamError(
            f"none of the captured layers {list(names)} holds image→text attention: choose layers that do "
            "(Wan: cross.N, not self.N)"
        )
    grid = np.stack([np.asarray(ds[c].values).astype(int) for c in ("frame", "y", "x")], axis=1)
    cross = np.nan_to_num(total[kept] / options.forwards)  # NaN: a key the call did not hold
    return cross, grid, list(names[kept]), intervened, _text_positions(ds)


def _attention(
    backend: _Backend, pixels: np.ndarray, prompt: RefamPrompt, options: RefamOptions, info: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Steps 3–4: the captured ``cross`` ``(layer, query, key_text)`` with the GAS handled.

    Returns it with the ``(frame, y, x)`` of each query, ``(query, 3)``, and the layer names;
    ``info`` gets ``gas_applied``, ``sinks`` and ``sink_layers``.
    """
    intervene = _intervention(backend, pixels, prompt, options, info)
    cross, grid, layer_names, intervened, text = _capture_cross(backend, pixels, prompt, options, intervene)
    if intervene is None:
        if options.gas == "none":
            info["gas_applied"] = "none"
        else:
            info["gas_applied"] = (
                "none (every GAS spared)" if info.get("spared_sinks") else "none (no GAS found)"
            )
    else:
        info["gas_applied"] = options.gas if intervened else "filter"
    if info["gas_applied"] == "filter":
        cross = _filter_sinks(cross, intervene.select, prompt.labels, text)
    return cross, grid, layer_names


def _grid(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``(..., query)`` → ``(..., frame, y, x)`` from the ``(frame, y, x)`` of each query, ``(query, 3)``."""
    f, y, x = grid.T
    out = np.zeros((*values.shape[:-1], f.max() + 1, y.max() + 1, x.max() + 1), dtype=np.float64)
    out[..., f, y, x] = values
    return out


def spatial_prior(
    directions: Sequence[str], shape: tuple[int, int], extent: float = 2 / 3, *, floor: float = 0.0
) -> np.ndarray:
    """The soft prior of spatial directions on a ``(h, w)`` grid: a product of linear ramps, ``(h, w)``.

    ``left`` is 1 at the left edge and falls linearly to 0 at ``extent`` of the width; ``right``,
    ``top``, ``bottom`` alike; ``middle`` falls from 1 at the vertical centre line to 0 at
    ``extent / 2`` of the width from it, both ways (referring "middle" is mostly horizontal).
    ``near``/``far`` (depth) give no prior. ``floor`` in ``[0, 1)`` lifts the product of the ramps
    to ``floor + (1 − floor) · ramp``: no region is ruled out (:func:`segment` passes
    ``prior_floor``, 0.1; here 0, the hard zero).

    >>> spatial_prior(["left"], (1, 4), extent=1.0).round(3).tolist()
    [[1.0, 0.667, 0.333, 0.0]]
    >>> spatial_prior(["left"], (1, 4), extent=1.0, floor=0.1).round(3).tolist()
    [[1.0, 0.7, 0.4, 0.1]]
    """
    _check_floor(floor)
    h, w = shape
    u = np.linspace(0.0, 1.0, w)[None, :] if w > 1 else np.zeros((1, 1))
    v = np.linspace(0.0, 1.0, h)[:, None] if h > 1 else np.zeros((1, 1))
    prior = np.ones((h, w))
    ramps = {
        "left": lambda: 1 - u / extent,
        "right": lambda: 1 - (1 - u) / extent,
        "top": lambda: 1 - v / extent,
        "bottom": lambda: 1 - (1 - v) / extent,
        "middle": lambda: 1 - np.abs(u - 0.5) / (extent / 2),
    }
    for d in directions:
        if d in ramps:
            prior = prior * np.clip(ramps[d](), 0.0, 1.0)
    return floor + (1.0 - floor) * prior


def _peaks(values: np.ndarray, k: int, exclude: np.ndarray | None = None) -> list[tuple[int, int]]:
    """The ``k`` highest local maxima (3 × 3) of a ``(h, w)`` map as ``(row, col)``, highest first."""
    from scipy import ndimage

    v = values.astype(np.float64).copy()
    if exclude is not None:
        v[exclude] = -np.inf
    local = (v == ndimage.maximum_filter(v, size=3, mode="nearest")) & np.isfinite(v)
    order = np.argsort(-v, axis=None, kind="stable")
    rows, cols = np.unravel_index(order, v.shape)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if local[r, c]][:k]


def _upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.as_tensor(grid, dtype=torch.float32)[None, None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _heat(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A token-grid heatmap ``(y, x)`` → ``(H, W)`` float32 in ``[0, 1]``."""
    return np.clip(_upsample(grid, size), 0.0, 1.0).astype(np.float32)


# -- the pipeline ------------------------------------------------------------------------------------


def segment(
    image: Any,
    expression: str,
    model: Any = "shapes-flux",
    segmenter: Any = None,
    **options: Any,
) -> RefamResult:
    """Segment the object a referring expression names, from a diffusion transformer's attention.

    >>> from attnlens.testing import tiny_shapes_pipeline
    >>> image = np.zeros((40, 50, 3), dtype=np.uint8)  # (H, W, 3)
    >>> r = segment(image, "the red circle", model=tiny_shapes_pipeline())
    >>> r.mask.shape, r.heatmap.shape, r.maps["target"].dims
    ((40, 50), (40, 50), ('layer', 'y', 'x'))

    Args:
        image: a PIL image or array, ``(H, W)`` grey, ``(H, W, 1|3|4)``, uint8 or float in
            ``[0, 1]``, any size (resized to the working resolution; RGBA drops alpha).
        expression: e.g. ``"the red mug on the left"``.
        model: a loaded diffusers ``FluxPipeline``, a :class:`~attnlens.zoo.ShapesPipeline`, or
            a zoo name for :func:`attnlens.zoo.load`.
        segmenter: ``None`` (the ``refiner`` option's), a ``(SamModel, SamProcessor)`` or
            ``(Sam2Model, Sam2Processor)`` pair from ``transformers``, or a callable ``(image (H,
            W, 3) uint8, points (n, 2) xy, labels (n,)) -> (H, W) bool``.
        **options: fields of :class:`RefamOptions`, over the options chosen for an embedded model
            (its ``refam_options``) and the defaults.

    Returns:
        a :class:`RefamResult`; ``mask`` and ``heatmap`` are ``(H, W)``, the input's size.

    Raises:
        EmptyExpressionError, NoNounError: the expression names nothing to segment.
        SegmenterMismatchError: the segmenter is not usable, or returned a mask of another size.
        UnsupportedModelError: the model is none of the above (or the zoo name is not shipped).
    """
    model = _loaded(model)
    opts = _options(options, model)
    parsed = parse(expression, parser=opts.parser)
    segment_fn = image_segmenter(opts.refiner if segmenter is None else segmenter)
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    backend = _backend(model, opts)
    prompt = _prompt(parsed, backend, opts)
    info = _info(backend, parsed)
    cross, grid, layer_names = _attention(backend, _resized(rgb, backend.side), prompt, opts, info)
    maps = _aggregate(cross, grid, layer_names, prompt, parsed, opts).isel(frame=0, drop=True)
    info["grid"] = tuple(maps["heatmap"].shape)
    heat = _heat(maps["heatmap"].values, (height, width))
    points, labels = _prompt_points(maps, opts, rgb, heat, segment_fn)
    mask, info["refiner"] = refine(
        rgb, heat, points, labels, segment_fn, enabled=opts.refine, component=opts.component
    )
    return RefamResult(
        mask=mask,
        heatmap=heat,
        points=points,
        point_labels=labels,
        maps=maps,
        prompt=prompt,
        expression=parsed,
        options=dataclasses.asdict(opts),
        info=info,
    )


def _loaded(model: Any) -> Any:
    """A zoo name's model, loaded; any other model as it is."""
    if isinstance(model, str):
        from .. import zoo

        return zoo.load(model)
    return model


def _options(options: dict[str, Any], model: Any = None) -> RefamOptions:
    """``**options`` of :func:`segment` over the model's own ``refam_options`` as
    :class:`RefamOptions` (unknown names are a ``TypeError``)."""
    fields = {f.name for f in dataclasses.fields(RefamOptions)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"unknown RefAM option(s) {unknown}; options: {', '.join(sorted(fields))}")
    return RefamOptions(**{**getattr(model, "refam_options", {}), **options})


def _prompt(parsed: ParsedExpression, backend: _Backend, opts: RefamOptions) -> RefamPrompt:
    """Step 2: the expression and appended magnets, tokenized for the backend's text encoder."""
    return build_prompt(
        parsed,
        backend.tokenizer,
        max_length=backend.max_length,
        caption=opts.caption,
        magnets=opts.magnets,
        colour=opts.colour,
        append=opts.append_magnets,
        targets=opts.targets,
    )


def _info(backend: _Backend, parsed: ParsedExpression) -> dict[str, Any]:
    return {
        "resolution": backend.side,
        "parser": parsed.parser,
        "sinks": [],
        "sink_layers": [],
        "spared_sinks": [],
    }


def _sink_columns(
    select: Any, labels: TokenLabels, n_text: int, text_positions: np.ndarray | None = None
) -> np.ndarray:
    """The text columns ``(key_text,)`` bool that the post-hoc sink filter drops.

    ``select`` is a :class:`~attnlens.interventions.TokenSelector` (joint positions, token kinds).
    None is dropped when the selection would take every text column: a row cannot be renormalised
    onto nothing.
    """
    text = np.arange(n_text) if text_positions is None else np.asarray(text_positions)
    drop = np.isin(text, list(select.positions))
    kinds = np.asarray(labels.token_kind, dtype=object)
    drop |= np.isin(kinds, [k for k in select.kind if k not in ("text", "image")])
    if "text" in select.kind:
        drop[:] = True
    return drop if not drop.all() else np.zeros_like(drop)


def _text_share(cross: np.ndarray, drop: np.ndarray | None = None) -> np.ndarray:
    """Each row of ``cross`` ``(..., query, key_text)`` as a distribution over its text keys, in place.

    The ``drop`` columns (the post-hoc sink filter's) are zeroed first, so the rows sum to 1 over
    the text keys that remain. ``cross`` is float; NaN (a key the call did not hold) stays NaN and
    counts as 0, and rows with no text mass (a layer without text keys) are left as they are.

    >>> _text_share(np.array([[0.1, 0.3, 0.0], [0.2, 0.2, 0.4]]), drop=np.array([False, False, True]))
    array([[0.25, 0.75, 0.  ],
           [0.5 , 0.5 , 0.  ]])
    """
    if drop is not None and drop.any():
        cross[..., drop] = 0.0
    total = np.nansum(cross, axis=-1, keepdims=True)
    return np.divide(cross, total, out=cross, where=total > 0)


def _filter_sinks(
    cross: np.ndarray, select: Any, labels: TokenLabels, text_positions: np.ndarray | None = None
) -> np.ndarray:
    """Drop sink text columns from captured rows ``(layer, query, key_text)`` and renormalise each row.

    The post-hoc form of :func:`attnlens.suppress` for adapters that cannot intervene: rows lose
    the sinks' mass ``m_q`` and are divided by ``1 − m_q``. ``select.positions`` are joint
    positions; ``text_positions`` ``(key_text,)`` are those of the text tokens (``None``: the text
    comes first, as in FLUX), and token kinds select as in :class:`TokenSelector`.
    """
    drop = _sink_columns(select, labels, cross.shape[-1], text_positions)
    if not drop.any():
        return cross
    moved = cross[..., drop].sum(axis=-1, keepdims=True)
    out = cross.copy()
    out[..., drop] = 0.0
    return out / np.clip(1.0 - moved, 1e-6, None)


def _aggregate(
    cross: np.ndarray,
    grid: np.ndarray,
    layer_names: list[str],
    prompt: RefamPrompt,
    parsed: ParsedExpression,
    opts: RefamOptions,
) -> xr.Dataset:
    """Step 5: target, magnet, aggregate, prior and heatmap maps on the token grid.

    ``cross`` is ``(layer, query, key_text)`` and ``grid`` the ``(frame, y, x)`` of each query.
    Returns ``target`` ``(layer, frame, y, x)``, ``magnet``, ``aggregate`` and ``heatmap``
    ``(frame, y, x)`` and ``prior`` ``(y, x)``; the heatmap is normalised to ``[0, 1]`` over all
    frames together, so that frames keep their relative strength.
    """
    kinds = np.asarray(prompt.labels.token_kind, dtype=object)
    words = set(range(len(kinds)))
    chosen = set(prompt.target.tolist())
    if not opts.filter_magnets:  # the ablation: stop words and magnets add their maps to the target's
        chosen |= {i for i in words if kinds[i] in ("stop", "magnet")}
    columns = sorted(chosen)
    target = _grid(cross[..., columns].sum(axis=-1), grid)  # (layer, frame, y, x)
    magnet = _grid(cross[..., prompt.magnet].sum(axis=-1).mean(axis=0), grid) if len(prompt.magnet) else None
    aggregate = target.mean(axis=0)
    shape = aggregate.shape[1:]
    prior = (
        spatial_prior(parsed.directions, shape, opts.prior_extent, floor=opts.prior_floor)
        if opts.spatial_prior
        else np.ones(shape)
    )
    heat = aggregate * prior
    lo, hi = float(heat.min()), float(heat.max())
    heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    dims = ("frame", "y", "x")
    data = {
        "target": (("layer", *dims), target),
        "aggregate": (dims, aggregate),
        "prior": (dims[1:], prior),
        "heatmap": (dims, heat),
    }
    if magnet is not None:
        data["magnet"] = (dims, magnet)
    return xr.Dataset(
        data,
        coords={
            "layer": layer_names,
            "frame": np.arange(aggregate.shape[0]),
            "y": np.arange(shape[0]),
            "x": np.arange(shape[1]),
        },
        attrs={"aggregated_positions": columns, "target_words": list(prompt.target_words)},
    )


def _prompt_points(
    maps: xr.Dataset, opts: RefamOptions, rgb: np.ndarray, heat: np.ndarray, segment_fn: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Step 6's ``(points (n, 2) xy, labels (n,))`` for one image ``rgb`` ``(H, W, 3)`` and its
    ``heat`` ``(H, W)``: the heatmap's peaks, or with ``prompts="grid"`` the token cell whose
    segment the heat favours most."""
    size = rgb.shape[:2]
    if opts.prompts == "peaks":
        return _points(maps, opts, size)
    if segment_fn is None:
        raise SegmenterMismatchError(
            "prompts='grid' prompts a segmenter with points: use refiner='region' or give segmenter="
            "(model, processor); the threshold refiner takes no points"
        )
    grid = maps["heatmap"].values
    gy, gx = grid.shape
    h, w = size
    rows, cols = np.unravel_index(np.argsort(-grid, axis=None, kind="stable")[:GRID_PROMPTS], grid.shape)
    cells = np.stack([(cols + 0.5) * w / gx, (rows + 0.5) * h / gy], axis=1)
    best = best_proposal(rgb, heat, cells, segment_fn)
    return cells[best : best + 1], np.ones(1, dtype=np.int64)


def _points(maps: xr.Dataset, opts: RefamOptions, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Step 6: positive peaks of a ``(y, x)`` heatmap, negatives where the magnets own more attention.

    Returns ``(points (n, 2) xy in input pixels of ``size`` (H, W), labels (n,))``.
    """
    heat = maps["heatmap"].values
    gy, gx = heat.shape
    cells = _peaks(heat, opts.n_points)
    labels = [1] * len(cells)
    if opts.negatives:
        if "magnet" in maps:
            m = maps["magnet"].values
            m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.zeros_like(m)
            owned = np.where(m > heat, m - heat, -np.inf)
        else:  # no magnets: the coldest cells
            owned = 1.0 - heat
        taken = np.zeros_like(heat, dtype=bool)
        for r, c in cells:
            taken[r, c] = True
        negatives = _peaks(owned, opts.negatives, exclude=taken | ~np.isfinite(owned))
        cells += negatives
        labels += [0] * len(negatives)
    h, w = size
    xy = np.array([[(c + 0.5) * w / gx, (r + 0.5) * h / gy] for r, c in cells], dtype=np.float64)
    return xy.reshape(-1, 2), np.array(labels, dtype=np.int64)
