"""Interventions: change the attention a model uses during a capture, to test what sinks do.

An intervention edits the attention probabilities ``P`` (rows: queries, columns: keys) of the
attention calls of chosen layers, for the keys ``S`` a :class:`TokenSelector` picks. With
``m_q = Σ_{s∈S} P[q, s]``, the mass each query gives the selected keys:

- :func:`suppress` drops the columns of ``S`` and renormalises each row:
  ``P'[q, k] = P[q, k] / (1 − m_q)`` for ``k ∉ S`` and ``0`` for ``k ∈ S`` (the softmax with
  ``S`` masked out);
- :func:`redirect` moves their mass evenly onto auxiliary keys ``O``:
  ``P'[q, o] = P[q, o] + m_q / |O|`` for ``o ∈ O``, ``0`` on ``S``, unchanged elsewhere.

The model then computes ``P'·V`` in place of ``softmax(QKᵀ·s)·V``: **its output changes, by
design**, unlike a plain capture, whose output is bit-for-bit that of the model. What a capture
keeps under an intervention is ``P'``: suppressed columns are zero and every row still sums to 1.
An intervention that selects no token leaves the call to the model's own kernel, so its outputs
are bitwise those without intervention.

Both run through the kernel SDPA itself picks (:func:`intervened_attention`): suppress masks
``S`` out, redirect replaces the values of ``S`` by the mean value of ``O``. They act on every
attention call of the chosen layers that holds a selected key, whatever the model family:
joint attention (FLUX, SD3, Chroma, …), per-sample calls (Mochi), separate self- and
cross-attention (Wan, LTX: a cross-attention call holds the text keys only, a
self-attention call none of them).

>>> import attnlens
>>> from attnlens.testing import tiny_flux_transformer, flux_inputs
>>> model = tiny_flux_transformer()
>>> with attnlens.capture(model, keep="key_mass", intervene=attnlens.suppress(positions=[0])) as cap:
...     _ = model(**flux_inputs(model))
>>> float(cap.result.key_mass.isel(key=0).max()), round(float(cap.result.key_mass.sum("key").min()), 5)
(0.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import kernels
from .errors import LayoutError
from .models.base import CallLayout
from .spec import CaptureSpec, LayerSelector
from .text import TokenLabels, _strip_markers

__all__ = ["Intervention", "TokenSelector", "intervened_attention", "redirect", "suppress"]


def _strings(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


@dataclass(frozen=True)
class TokenSelector:
    """Positions of the joint sequence, chosen by token string, kind, word or position (a union).

    Args:
        tokens: token strings as the tokenizer writes them (``"<pad>"``, ``"</s>"``), also
            matched without word markers (``"the"`` matches ``"▁the"``).
        kind: token kinds (``pad``, ``stop``, ``special``, ``magnet``, ``content``, ``text``
            for every text token, ``image`` for every image/video token).
        word: words, case-insensitive (every token of the word).
        positions: indices into the joint sequence, the ``key`` coordinate of a capture
            (what :func:`attnlens.analysis.find_sinks` reports).

    >>> TokenSelector(kind="pad").empty, TokenSelector().empty
    (False, True)
    """

    tokens: tuple[str, ...] = ()
    kind: tuple[str, ...] = ()
    word: tuple[str, ...] = ()
    positions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", _strings(self.tokens))
        object.__setattr__(self, "kind", _strings(self.kind))
        object.__setattr__(self, "word", tuple(w.lower() for w in _strings(self.word)))
        positions = (self.positions,) if isinstance(self.positions, int) else self.positions
        object.__setattr__(self, "positions", tuple(int(p) for p in positions))

    @property
    def empty(self) -> bool:
        """Whether no criterion is given (the selector picks nothing)."""
        return not (self.tokens or self.kind or self.word or self.positions)

    @property
    def needs_labels(self) -> bool:
        """Whether resolving needs token labels (anything but positions and the text/image kinds)."""
        return bool(self.tokens or self.word or set(self.kind) - {"text", "image"})

    def resolve(self, layout: CallLayout, labels: Sequence[TokenLabels], batch: int) -> torch.Tensor:
        """The selected positions of each batch row, ``(batch, seq)`` bool.

        Batch rows beyond the labelled samples (a batched ``[uncond, cond]`` forward) take the
        labels of sample ``row % len(labels)``: the prompt's, also on negative-prompt rows.
        """
        seq = layout.seq_len
        out = torch.zeros(batch, seq, dtype=torch.bool)
        bad = [p for p in self.positions if not -seq <= p < seq]
        if bad:
            raise LayoutError(
                f"positions {bad} lie outside the joint sequence of {seq} tokens (0 … {seq - 1})"
            )
        if self.positions:
            out[:, list(self.positions)] = True
        if "image" in self.kind:
            out[:, layout.image] = True
        if "text" in self.kind:
            out[:, layout.text] = True
        if not self.needs_labels:
            return out
        kinds = set(self.kind) - {"text", "image"}
        # unlabelled text (a bare transformer without labels=) knows at most which tokens are padding
        unlabelled = not labels or all(set(lab.token_kind.tolist()) <= {"text", "pad"} for lab in labels)
        if unlabelled and (self.tokens or self.word or kinds - {"pad"}):
            raise LayoutError(
                "selecting tokens by string, word or kind needs token labels, and this capture has none: "
                "capture a pipeline (labelled by its tokenizer), pass labels= to attnlens.capture, "
                "or select by positions="
            )
        if not labels:
            return out
        text = layout.text.cpu()
        for row in range(batch):
            lab = labels[row % len(labels)]
            hit = [
                (str(t) in self.tokens or _strip_markers(str(t)) in self.tokens)
                or str(w).lower() in self.word
                or str(k) in kinds
                for t, w, k in zip(lab.token_str, lab.word, lab.token_kind, strict=True)
            ]
            out[row, text[torch.tensor(hit, dtype=torch.bool)]] = True
        return out

    def describe(self) -> dict[str, list]:
        """A JSON-able description (kept in a capture's attributes)."""
        return {
            name: list(getattr(self, name))
            for name in ("tokens", "kind", "word", "positions")
            if getattr(self, name)
        }


@dataclass(frozen=True)
class Intervention:
    """A change of the attention a model uses; build it with :func:`suppress` or :func:`redirect`.

    Attributes:
        mode: ``"suppress"`` or ``"redirect"``.
        select: the keys whose attention is removed.
        onto: where :func:`redirect` moves it (``None`` for ``suppress``).
        layers: the attention layers it applies to, as :attr:`CaptureSpec.layers`
            (``None``: every attention layer, whether captured or not).
    """

    mode: str
    select: TokenSelector
    onto: TokenSelector | None = None
    layers: LayerSelector = None

    def __post_init__(self) -> None:
        if self.mode not in ("suppress", "redirect"):
            raise ValueError(f"unknown intervention mode {self.mode!r}: use 'suppress' or 'redirect'")
        if self.mode == "redirect" and (self.onto is None or self.onto.empty) and not self.select.empty:
            raise ValueError("redirect needs auxiliary tokens to move the mass onto: give onto=")

    def select_layers(self, names: Sequence[str]) -> list[str]:
        """The layers of ``names`` this intervention applies to."""
        return CaptureSpec(layers=self.layers).select_layers(names)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (kept as the ``intervention`` attribute of a capture)."""
        out: dict[str, Any] = {"mode": self.mode, "select": self.select.describe()}
        if self.onto is not None:
            out["onto"] = self.onto.describe()
        if self.layers is not None:
            out["layers"] = self.layers if isinstance(self.layers, str | int) else list(self.layers)
        return out


def _selector(value: TokenSelector | Sequence[str] | Sequence[int] | Mapping[str, Any]) -> TokenSelector:
    if isinstance(value, TokenSelector):
        return value
    if isinstance(value, Mapping):
        return TokenSelector(**value)
    if isinstance(value, str):
        return TokenSelector(tokens=(value,))
    values = list(value)
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return TokenSelector(positions=tuple(values))
    return TokenSelector(tokens=tuple(str(v) for v in values))


def suppress(
    tokens: str | Sequence[str] = (),
    *,
    kind: str | Sequence[str] = (),
    word: str | Sequence[str] = (),
    positions: int | Sequence[int] = (),
    layers: LayerSelector = None,
) -> Intervention:
    """Drop the attention to the selected keys and renormalise every row (see the module docs).

    The keys are those any of ``tokens``, ``kind``, ``word`` or ``positions`` selects, as in
    :class:`TokenSelector`; ``layers`` are the layers to intervene in (default every attention
    layer, as :attr:`CaptureSpec.layers`).

    >>> suppress(["<pad>"], kind="special").describe()
    {'mode': 'suppress', 'select': {'tokens': ['<pad>'], 'kind': ['special']}}
    """
    return Intervention("suppress", TokenSelector(tokens, kind, word, positions), layers=layers)


def redirect(
    tokens: str | Sequence[str] = (),
    *,
    onto: TokenSelector | Sequence[str] | Sequence[int] | Mapping[str, Any],
    kind: str | Sequence[str] = (),
    word: str | Sequence[str] = (),
    positions: int | Sequence[int] = (),
    layers: LayerSelector = None,
) -> Intervention:
    """Move the attention of the selected keys evenly onto auxiliary keys ``onto``.

    The keys whose mass moves are those any of ``tokens``, ``kind``, ``word`` or ``positions``
    selects, as in :class:`TokenSelector`; ``layers`` are the layers to intervene in (default
    every attention layer).

    Args:
        onto: the receiving keys: a :class:`TokenSelector`, token strings, joint-sequence
            positions, or a mapping of :class:`TokenSelector` fields (``{"kind": "magnet"}``).

    >>> redirect(kind="pad", onto={"kind": "magnet"}).describe()
    {'mode': 'redirect', 'select': {'kind': ['pad']}, 'onto': {'kind': ['magnet']}}
    """
    return Intervention(
        "redirect", TokenSelector(tokens, kind, word, positions), onto=_selector(onto), layers=layers
    )


def intervened_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    drop: torch.Tensor,
    onto: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention under :func:`suppress` (``onto=None``) or :func:`redirect`, through SDPA's own kernel.

    Suppress is SDPA with the selected keys masked out; redirect is SDPA over the unchanged
    logits with the values of the selected keys replaced by the mean value of the receiving
    keys, since ``Σ_{k∉S} P[q,k]·v_k + m_q·mean_{o∈O} v_o = P′·V``. Both run the fused kernel
    SDPA picks (:mod:`attnlens.kernels`), with gradients.

    Args:
        query: ``(batch, heads, query, head_dim)``, as SDPA takes it.
        key: ``(batch, heads, key, head_dim)``.
        value: ``(batch, heads, key, value_dim)``.
        drop: ``(batch, key)`` bool, the keys ``S`` whose attention is removed.
        onto: ``(batch, key)`` bool, the keys ``O`` that receive it (redirect), disjoint from
            ``drop``; ``None`` renormalises instead (suppress).
        attn_mask: the call's own SDPA mask, boolean (True = attend) or additive.
        scale: logit scale, default ``1/sqrt(head_dim)``.
        is_causal: as SDPA takes it.

    Returns:
        ``(output, lse)``: ``(batch, heads, query, value_dim)`` in ``value``'s dtype, and the
        log-sum-exp ``(batch, heads, query)`` of the logits the kernel normalised (suppress:
        without ``S``; redirect: all of them), ``None`` where no kernel gives it.

    >>> q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    >>> drop = torch.tensor([[False, True, False, False]])
    >>> out, lse = intervened_attention(q, k, v, drop=drop)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~drop[:, None, None, :])
    >>> torch.equal(out, ref)
    True
    """
    mask, value = intervened_inputs(drop, onto, attn_mask, value)
    out, lse, _ = kernels.attention(query, key, value, mask, 0.0, is_causal, scale)
    return out, lse


def intervened_inputs(
    drop: torch.Tensor, onto: torch.Tensor | None, attn_mask: torch.Tensor | None, value: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The mask and values of an intervened call (out of place, so that gradients flow)."""
    drop = drop.to(value.device)
    if onto is None:
        if drop.all(dim=1).any():
            raise LayoutError("suppress selects every key of a call: no attention would be left")
        keep = ~drop[:, None, None, :]
        if attn_mask is None:
            return keep, value
        if attn_mask.dtype == torch.bool:
            return attn_mask & keep, value
        return torch.where(keep, attn_mask, torch.tensor(float("-inf"), dtype=attn_mask.dtype)), value
    onto = onto.to(value.device)
    if (onto & drop).any():
        raise LayoutError("redirect: the receiving tokens (onto) overlap the tokens whose mass moves")
    if not onto.any(dim=1)[drop.any(dim=1)].all():
        raise LayoutError("redirect: onto selects no key of a call whose attention moves")
    share = onto.to(value.dtype) / onto.sum(dim=1, keepdim=True).clamp_min(1).to(value.dtype)
    mean = torch.einsum("bk,bhkd->bhd", share, value)
    return attn_mask, torch.where(drop[:, None, :, None], mean[:, :, None, :], value)


@dataclass
class Intervener:
    """Applies one :class:`Intervention` during a capture (used by the capture's recorder)."""

    intervention: Intervention
    layers: set[str]
    _masks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None, bool]] = field(
        default_factory=dict
    )

    def plan(
        self,
        layout: CallLayout,
        labels: Sequence[TokenLabels],
        rows: torch.Tensor | None,
        keys: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(drop, onto)`` over one call's keys, ``(call batch, key)`` bool; ``None``: nothing to change.

        Args:
            layout: the forward's layout.
            labels: the token labels of the forward's run.
            rows: the forward's batch rows the call holds (``None``: all).
            keys: the joint positions of the call's keys (``None``: the joint sequence).
        """
        drop, onto, selected = self._resolve(layout, labels)
        if not selected:
            return None  # nothing selected: the model's own kernel runs, outputs stay bitwise identical
        if rows is not None:
            drop, onto = drop[rows], None if onto is None else onto[rows]
        if keys is not None:
            drop, onto = drop[:, keys], None if onto is None else onto[:, keys]
        if not drop.any():
            return None
        return drop, onto

    def _resolve(
        self, layout: CallLayout, labels: Sequence[TokenLabels]
    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """``drop``, ``onto`` over the forward's rows and joint sequence, and whether anything is selected."""
        cache_key = (id(labels), layout.batch)  # labels belong to one run: resolve once per run
        if cache_key not in self._masks:
            iv = self.intervention
            drop = iv.select.resolve(layout, labels, layout.batch)
            onto = iv.onto.resolve(layout, labels, layout.batch) if iv.onto is not None else None
            self._masks = {cache_key: (drop, onto, bool(drop.any()))}
        return self._masks[cache_key]
