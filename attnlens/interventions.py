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

The replacement is computed by :func:`intervened_attention`, a chunked float32 pass over
queries (at most ``chunk_bytes`` of logits at once) in the layout of the call it replaces,
``(batch, seq, heads, head_dim)``; it does not use the fused kernel the model would have.

>>> import attnlens
>>> from attnlens.testing import tiny_flux_transformer, flux_inputs
>>> model = tiny_flux_transformer()
>>> with attnlens.capture(model, keep="key_mass", intervene=attnlens.suppress(positions=[0])) as cap:
...     _ = model(**flux_inputs(model))
>>> float(cap.result.key_mass.isel(key=0).max()), round(float(cap.result.key_mass.sum("key").min()), 5)
(0.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .capture import CaptureSpec, LayerSelector, _apply_mask, _reduce
from .errors import HookError, LayoutError
from .models.base import CallLayout
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
    chunk_bytes: int = 64 * 2**20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output under :func:`suppress` (``onto=None``) or :func:`redirect`, chunked over queries.

    Args:
        query: ``(batch, seq, heads, head_dim)``, as the model's attention function receives it.
        key: ``(batch, seq, heads, head_dim)``.
        value: ``(batch, seq, heads, head_dim)``.
        drop: ``(batch, seq)`` bool, the keys ``S`` whose attention is removed.
        onto: ``(batch, seq)`` bool, the keys ``O`` that receive it (redirect), disjoint from
            ``drop``; ``None`` renormalises instead (suppress).
        attn_mask: the call's own boolean (True = attend) or additive mask, broadcastable to
            ``(batch, heads, seq, seq)``.
        scale: logit scale, default ``1/sqrt(head_dim)``.
        chunk_bytes: float32 budget of one chunk of logits.

    Returns:
        ``(output, moved)``: ``output`` ``(batch, seq, heads, head_dim)`` in ``value``'s dtype,
        and ``moved`` ``(batch, heads, seq)`` float32, the mass ``m_q`` each query gave ``S``
        before the intervention.

    >>> q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    >>> out, moved = intervened_attention(q, k, v, drop=torch.zeros(1, 4, dtype=torch.bool))
    >>> ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    >>> bool(torch.allclose(out, ref.transpose(1, 2), atol=1e-6)), float(moved.abs().max())
    (True, 0.0)
    """
    if query.ndim != 4 or query.shape != key.shape or key.shape[:3] != value.shape[:3]:
        raise HookError(
            "an intervention needs joint attention with query, key and value of layout (batch, seq, heads, "
            f"head_dim) and one key per query; got {tuple(query.shape)}, {tuple(key.shape)}, "
            f"{tuple(value.shape)}"
        )
    batch, n = query.shape[:2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    q = query.transpose(1, 2).float()  # (batch, heads, seq, head_dim)
    k_t = key.transpose(1, 2).float().transpose(-1, -2)
    v = value.transpose(1, 2).float()
    dropped = drop.to(q.device)[:, None, None, :]  # broadcasts over heads and query rows
    share = None
    if onto is not None:
        onto = onto.to(q.device)
        if (onto & drop.to(q.device)).any():
            raise LayoutError("redirect: the receiving tokens (onto) overlap the tokens whose mass moves")
        if not onto.any(dim=1)[drop.to(q.device).any(dim=1)].all():
            raise LayoutError("redirect: onto selects no token in a sample whose attention moves")
        share = (onto.float() / onto.float().sum(dim=1, keepdim=True).clamp_min(1))[:, None, None, :]
    elif drop.all(dim=1).any():
        raise LayoutError("suppress selects every token of a sample: no attention would be left")
    chunk = max(1, chunk_bytes // (3 * 4 * batch * q.shape[1] * n))
    outs, moved = [], []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=q.device)
        logits = torch.matmul(q[:, :, start : start + len(rows)], k_t).mul_(scale)
        if attn_mask is not None:
            logits = _apply_mask(logits, attn_mask, rows)
        # out of place from here on, so that gradients flow through an intervened model
        if share is None:  # masking the logits keeps rows exact even when S took nearly all the mass
            kept = logits.masked_fill(dropped, float("-inf"))
            lse_kept = torch.logsumexp(kept, dim=-1)
            moved.append(-torch.expm1(lse_kept - torch.logsumexp(logits, dim=-1)))
            probs = torch.softmax(kept, dim=-1)
        else:
            probs = torch.softmax(logits, dim=-1)
            gone = (probs * dropped).sum(dim=-1, keepdim=True)
            moved.append(gone.squeeze(-1))
            probs = probs.masked_fill(dropped, 0.0) + gone * share
        outs.append(torch.matmul(probs, v))
    output = torch.cat(outs, dim=2).transpose(1, 2).to(value.dtype).contiguous()
    return output, torch.cat(moved, dim=2)


@dataclass
class _Plan:
    """One call's intervention: the keys, and (redirect) the mass each query moved."""

    drop: torch.Tensor  # (batch, seq) bool
    onto: torch.Tensor | None  # (batch, seq) bool
    moved: torch.Tensor | None = None  # (batch, heads, seq)


@dataclass
class Intervener:
    """Applies one :class:`Intervention` during a capture (used by :class:`attnlens.Capture`)."""

    intervention: Intervention
    layers: set[str]
    _masks: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor | None, bool]] = field(
        default_factory=dict
    )
    _pending: tuple[str, _Plan] | None = None

    def output(
        self,
        layer: str,
        call: Mapping[str, Any],
        layout: CallLayout,
        labels: Sequence[TokenLabels],
        chunk_bytes: int,
    ) -> torch.Tensor | None:
        """The replaced output of one attention call, or ``None`` to let the original run."""
        self._pending = None
        if layer not in self.layers:
            return None
        query, key, value = call.get("query"), call.get("key"), call.get("value")
        if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
            raise HookError(
                f"layer {layer}: the intercepted call shows no query, key and value to intervene on"
            )
        if query.shape[1] != layout.seq_len or key.shape[1] != layout.seq_len:
            raise HookError(
                f"layer {layer} attends over {key.shape[1]} of the forward's {layout.seq_len} tokens; "
                "interventions support joint attention over the whole sequence only"
            )
        if call.get("is_causal") or call.get("enable_gqa") or (call.get("dropout_p") or 0.0) > 0.0:
            raise HookError(
                f"layer {layer}: interventions support non-causal attention without dropout or GQA"
            )
        if call.get("parallel_config") is not None:
            raise HookError(f"layer {layer}: interventions do not support context-parallel attention")
        drop, onto, selected = self._resolve(layout, labels, query.shape[0], query.device)
        if not selected:
            return None  # nothing selected: the model's own kernel runs, outputs stay bitwise identical
        out, moved = intervened_attention(
            query,
            key,
            value,
            drop=drop,
            onto=onto,
            attn_mask=call.get("attn_mask"),
            scale=call.get("scale"),
            chunk_bytes=chunk_bytes,
        )
        self._pending = (layer, _Plan(drop, onto, moved.detach()))
        return out

    def take(self, layer: str) -> _Plan | None:
        """The plan of the call whose output was just replaced, for the capture of that call."""
        pending, self._pending = self._pending, None
        return pending[1] if pending is not None and pending[0] == layer else None

    def _resolve(
        self, layout: CallLayout, labels: Sequence[TokenLabels], batch: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """``drop``, ``onto`` on ``device``, and whether anything is selected (no device sync per call)."""
        cache_key = (id(labels), batch, str(device))  # labels belong to one run: resolve once per run
        if cache_key not in self._masks:
            iv = self.intervention
            drop = iv.select.resolve(layout, labels, batch)
            onto = iv.onto.resolve(layout, labels, batch) if iv.onto is not None else None
            self._masks = {
                cache_key: (drop.to(device), None if onto is None else onto.to(device), bool(drop.any()))
            }
        return self._masks[cache_key]


def capture_mask(plan: _Plan, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """The call's mask with suppressed keys masked out, for the capture math (exact zeros)."""
    keep = ~plan.drop[:, None, None, :]
    if attn_mask is None:
        return keep
    keep = keep.to(attn_mask.device)
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.float().masked_fill(~keep, float("-inf"))


def redirected_slices(
    slices: Mapping[str, torch.Tensor],
    plan: _Plan,
    *,
    text: torch.Tensor,
    image: torch.Tensor,
    heads: Sequence[int] | None,
    reduction: str | None,
) -> dict[str, torch.Tensor]:
    """Per-head slices of ``P`` (:func:`~attnlens.capture.attention_slices`) turned into ``P'`` (redirect).

    Each kept variable is edited linearly: the dropped columns are zeroed and every row ``q``
    adds ``m_q / |O|`` on the receiving columns; ``key_mass`` adds the mean of ``m_q``.
    Reductions over heads are applied afterwards (``max`` is not linear).
    """
    assert plan.onto is not None and plan.moved is not None
    moved = plan.moved
    if heads is not None:
        moved = moved.index_select(1, torch.as_tensor(list(heads), device=moved.device))
    device = moved.device
    keep = (~plan.drop).to(device).float()[:, None, :]  # (batch, 1, seq)
    share = plan.onto.to(device).float()
    share = (share / share.sum(dim=1, keepdim=True).clamp_min(1))[:, None, :]
    text, image = text.to(device), image.to(device)
    rows_cols = {"cross": (image, text), "text_to_image": (text, image), "full": (None, None)}
    out = {}
    for var, tensor in slices.items():
        tensor = tensor.to(device)
        if var == "key_mass":
            edited = tensor * keep + moved.mean(dim=-1, keepdim=True) * share
        else:
            rows, cols = rows_cols[var]
            m = moved if rows is None else moved[..., rows]
            k, s = (keep, share) if cols is None else (keep[..., cols], share[..., cols])
            edited = tensor * k[:, :, None, :] + m[..., None] * s[:, :, None, :]
        out[var] = _reduce(edited, reduction)
    return out
