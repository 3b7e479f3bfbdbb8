"""What a capture keeps from each attention call: :class:`CaptureSpec`."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import EmptySpecError, HeadIndexError, UnknownLayerError, choices

__all__ = ["KEEP_CHOICES", "CaptureSpec"]

#: What a capture can keep, see :class:`CaptureSpec`.
KEEP_CHOICES = ("cross", "text_to_image", "key_mass", "hidden_norm", "full")
HEAD_REDUCTIONS = ("mean", "max")

LayerSelector = str | int | Sequence[str | int] | None
HeadSelector = str | int | Sequence[int]
StepSelector = int | Sequence[int] | Callable[[float], bool] | None


@dataclass(frozen=True)
class CaptureSpec:
    """Which attention to keep, where, and in what form.

    Args:
        layers: ``None`` for every attention layer; otherwise layer names, glob patterns over
            them (``"double.3"``, ``"single.*"``) or indices into the model's layer list
            (execution order), alone or in a list.
        heads: ``"all"``; a head index or a list of them; or a reduction over all heads
            (``"mean"``, ``"max"``), computed on the device before the copy to host.
        timesteps: ``None`` for every denoising step; step indices (``[0, 5]``); or a
            predicate on the timestep value (``lambda t: t > 500``).
        keep: any of ``"cross"`` (image/video queries → text keys), ``"text_to_image"``
            (text queries → image keys), ``"key_mass"`` (mean attention each key receives over
            all queries), ``"hidden_norm"`` (L2 norm of each token's block output) and
            ``"full"`` (the dense matrix; opt-in, bounded by ``max_full_bytes``).
        dtype: dtype of what is kept (the math itself runs in float32).
        device: device of what is kept.
        chunk_bytes: memory budget of the float32 temporaries of one chunk of query rows; bounds
            peak memory.
        max_full_bytes: largest ``full`` capture held in memory before a forward is refused;
            a capture with ``store=`` streams ``full`` to the store and is limited by its disk.

    >>> spec = CaptureSpec(layers="double.*", heads="mean", keep=("cross", "key_mass"))
    >>> spec.keep
    ('cross', 'key_mass')
    >>> CaptureSpec(keep=())
    Traceback (most recent call last):
    ...
    attnlens.errors.EmptySpecError: CaptureSpec keeps nothing: choose keep from cross, text_to_image, \
key_mass, hidden_norm, full
    """

    layers: LayerSelector = None
    heads: HeadSelector = "all"
    timesteps: StepSelector = None
    keep: Sequence[str] = ("cross",)
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"
    chunk_bytes: int = 64 * 2**20
    max_full_bytes: int = 2 * 2**30

    def __post_init__(self) -> None:
        keep = (self.keep,) if isinstance(self.keep, str) else tuple(self.keep)
        object.__setattr__(self, "keep", keep)
        if not keep:
            raise EmptySpecError(f"CaptureSpec keeps nothing: choose keep from {choices(KEEP_CHOICES)}")
        unknown = [k for k in keep if k not in KEEP_CHOICES]
        if unknown:
            raise EmptySpecError(f"unknown keep {unknown}: choose from {choices(KEEP_CHOICES)}")
        if isinstance(self.heads, str) and self.heads not in ("all", *HEAD_REDUCTIONS):
            raise EmptySpecError(f"unknown heads {self.heads!r}: use 'all', 'mean', 'max' or head indices")
        if self.chunk_bytes <= 0 or self.max_full_bytes < 0:
            raise EmptySpecError("chunk_bytes must be positive and max_full_bytes non-negative")

    @property
    def attention_keeps(self) -> tuple[str, ...]:
        """The kept variables that come from attention probabilities (not ``hidden_norm``)."""
        return tuple(k for k in self.keep if k != "hidden_norm")

    def select_layers(self, names: Sequence[str]) -> list[str]:
        """Resolve :attr:`layers` against a model's layer names, in execution order.

        >>> CaptureSpec(layers=["single.*", 0]).select_layers(["double.0", "single.0", "single.1"])
        ['double.0', 'single.0', 'single.1']
        >>> CaptureSpec(layers="double.9").select_layers(["double.0"])
        Traceback (most recent call last):
        ...
        attnlens.errors.UnknownLayerError: layer 'double.9' matches no attention layer; valid: double.0
        """
        if self.layers is None:
            return list(names)
        selectors = [self.layers] if isinstance(self.layers, str | int) else list(self.layers)
        chosen: set[str] = set()
        for sel in selectors:
            if isinstance(sel, int) and not isinstance(sel, bool):
                if not -len(names) <= sel < len(names):
                    raise UnknownLayerError(
                        f"layer index {sel} out of range for {len(names)} layers; valid: {choices(names)}"
                    )
                chosen.add(names[sel])
                continue
            matched = fnmatch.filter(names, str(sel))
            if not matched:
                raise UnknownLayerError(f"layer {sel!r} matches no attention layer; valid: {choices(names)}")
            chosen.update(matched)
        return [n for n in names if n in chosen]

    def select_heads(self, num_heads: int) -> tuple[list[int] | None, str | None]:
        """Resolve :attr:`heads` for a layer with ``num_heads`` heads.

        Returns ``(indices, reduction)``: head indices to keep (``None`` = all) and the
        reduction applied over them (``None`` = keep each head).

        >>> CaptureSpec(heads=[0, 2]).select_heads(4)
        ([0, 2], None)
        >>> CaptureSpec(heads=5).select_heads(4)
        Traceback (most recent call last):
        ...
        attnlens.errors.HeadIndexError: head 5 out of range: the layer has 4 heads (valid: 0 … 3)
        """
        if isinstance(self.heads, str):
            return None, (None if self.heads == "all" else self.heads)
        indices = [self.heads] if isinstance(self.heads, int) else [int(h) for h in self.heads]
        if not indices:
            raise HeadIndexError("heads is an empty list: give head indices, 'all', 'mean' or 'max'")
        for h in indices:
            if not 0 <= h < num_heads:
                raise HeadIndexError(
                    f"head {h} out of range: the layer has {num_heads} heads (valid: 0 … {num_heads - 1})"
                )
        return indices, None

    def head_labels(self, num_heads: int) -> list[int] | list[str]:
        """Labels of the ``head`` coordinate: head indices, or the reduction's name."""
        indices, reduction = self.select_heads(num_heads)
        if reduction is not None:
            return [reduction]
        return list(range(num_heads)) if indices is None else indices

    def wants_step(self, step: int, timestep: float) -> bool:
        """Whether denoising step ``step`` (at ``timestep``) is captured.

        >>> CaptureSpec(timesteps=lambda t: t > 500).wants_step(0, 999.0)
        True
        >>> CaptureSpec(timesteps=[1, 2]).wants_step(0, 999.0)
        False
        """
        sel = self.timesteps
        if sel is None:
            return True
        if callable(sel):
            return bool(sel(timestep))
        return step in ([sel] if isinstance(sel, int) else list(sel))

    def describe(self) -> dict[str, Any]:
        """A JSON-able description, kept as the ``capture_spec`` attribute of a capture (and its store).

        >>> CaptureSpec(layers="single.*", keep="cross").describe()["layers"]
        'single.*'
        """

        def plain(value: Any) -> Any:
            if value is None or isinstance(value, str | int):
                return value
            return repr(value) if callable(value) else list(value)

        return {
            "layers": plain(self.layers),
            "heads": plain(self.heads),
            "timesteps": plain(self.timesteps),
            "keep": list(self.keep),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
