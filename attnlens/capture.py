"""What to keep from each attention call, and the chunked math that computes it.

Fused attention kernels never return probabilities. attnlens recomputes only what a
:class:`CaptureSpec` asks for from the query and key tensors the model already computed
(post-norm, post-RoPE), and lets the original attention call run untouched, so the model's
output does not change. Rows of ``softmax(QKᵀ·s)`` are normalised by their log-sum-exp,
computed over chunks of queries whose size bounds peak memory: no ``N × N`` matrix exists
unless ``full`` is asked for.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import EmptySpecError, HeadIndexError, UnknownLayerError, choices

__all__ = ["KEEP_CHOICES", "CaptureSpec", "attention_slices"]

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
        chunk_bytes: memory budget of one query chunk's float32 logits; bounds peak memory.
        max_full_bytes: largest ``full`` capture accepted before a forward is refused.

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


def attention_slices(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    text: torch.Tensor,
    image: torch.Tensor,
    keep: Sequence[str],
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    heads: Sequence[int] | None = None,
    reduction: str | None = None,
    chunk_bytes: int = 64 * 2**20,
    key_text: torch.Tensor | None = None,
    key_image: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Attention probabilities restricted to what ``keep`` asks for, without an ``N × N`` matrix.

    ``P[q, k] = exp(q·k·s − lse_q)`` where ``lse_q`` is the log-sum-exp of row ``q``,
    computed over chunks of queries so that at most ``chunk_bytes`` of float32 logits exist
    at once.

    Args:
        query: ``(batch, seq, heads, head_dim)``, post-norm and post-RoPE.
        key: ``(batch, seq, heads, head_dim)``.
        text: positions of text tokens in ``seq``, ascending, shape ``(key_text,)``.
        image: positions of image/video tokens in ``seq``, ascending, shape ``(query,)``.
        keep: subset of ``cross``, ``text_to_image``, ``key_mass``, ``full``.
        scale: logit scale, default ``1/sqrt(head_dim)``.
        attn_mask: boolean (True = attend) or additive mask broadcastable to
            ``(batch, heads, seq, seq)``.
        heads: head indices to keep (default all).
        reduction: ``"mean"`` or ``"max"`` over the kept heads, or ``None``.
        chunk_bytes: float32 budget of one chunk of logits.
        key_text: positions of text tokens among the keys when the keys are not the query
            sequence (a cross-attention or image-only call); ``text`` and ``image`` then
            index the queries only. Default: ``text``.
        key_image: positions of image/video tokens among the keys; default ``image``.

    Returns:
        float32 tensors: ``cross`` ``(batch, head, query, key_text)``; ``text_to_image``
        ``(batch, head, query_text, key_image)``; ``key_mass`` ``(batch, head, key)``;
        ``full`` ``(batch, head, query_all, key)``; ``head`` has size 1 under a reduction.
        A query row the mask excludes from every key (Chroma's padded text) has probabilities
        0, not NaN, and ``key_mass`` averages over the query rows that attend.

    >>> q, k = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    >>> out = attention_slices(q, k, text=torch.arange(2), image=torch.arange(2, 5), keep=["cross", "full"])
    >>> out["cross"].shape, out["full"].shape
    (torch.Size([1, 2, 3, 2]), torch.Size([1, 2, 5, 5]))
    >>> bool(torch.allclose(out["full"].sum(-1), torch.ones(1, 2, 5)))
    True
    """
    if query.ndim != 4 or key.ndim != 4 or query.shape[0] != key.shape[0] or query.shape[2:] != key.shape[2:]:
        raise ValueError(
            f"query and key must be (batch, seq, heads, head_dim) with matching batch, heads and head_dim; "
            f"got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    n = key.shape[1]
    n_query = query.shape[1]
    if n_query != n and key_text is None and key_image is None:
        raise ValueError(
            f"joint attention needs as many queries as keys; got {n_query} and {n} "
            "(give key_text/key_image for a call whose keys are another sequence)"
        )
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    q = query.transpose(1, 2)  # (batch, heads, seq, head_dim)
    k = key.transpose(1, 2)
    if heads is not None:
        index = torch.as_tensor(list(heads), device=q.device)
        q, k = q.index_select(1, index), k.index_select(1, index)
    # one contiguous float32 copy of q and kᵀ: O(seq) memory, and every chunk's matmul reads them directly
    q = q.float().contiguous()
    k_t = k.float().transpose(-1, -2).contiguous()
    text, image = text.to(q.device), image.to(q.device)
    text_cols = _index(text if key_text is None else key_text.to(q.device))
    image_cols = _index(image if key_image is None else key_image.to(q.device))
    batch, num_heads = q.shape[:2]

    all_rows = "key_mass" in keep or "full" in keep
    if all_rows:
        row_sets = [("all", torch.arange(n_query, device=q.device))]
    else:
        row_sets = [
            (name, rows) for name, rows in (("cross", image), ("text_to_image", text)) if name in keep
        ]

    # logits, exp and a temporary: three float32 (batch, heads, chunk, seq) tensors at once
    chunk = max(1, chunk_bytes // (3 * 4 * batch * num_heads * n))
    # outputs are allocated once and filled in place: small per-chunk pieces interleaved with the
    # chunks' large temporaries fragment the heap until it holds as much as an N × N matrix
    n_text_cols = len(text) if key_text is None else len(key_text)
    n_image_cols = len(image) if key_image is None else len(key_image)
    shapes = {
        "cross": (len(image), n_text_cols),
        "text_to_image": (len(text), n_image_cols),
        "full": (n_query, n),
    }
    heads_out = 1 if reduction is not None else num_heads
    out = {name: q.new_empty(batch, heads_out, *shapes[name]) for name in keep if name in shapes}
    image_row = torch.full((n_query,), -1, dtype=torch.long, device=q.device)
    image_row[image] = torch.arange(len(image), device=q.device)
    text_row = torch.full((n_query,), -1, dtype=torch.long, device=q.device)
    text_row[text] = torch.arange(len(text), device=q.device)
    is_image, is_text = image_row >= 0, text_row >= 0
    mass = torch.zeros(batch, num_heads, n, device=q.device) if "key_mass" in keep else None
    attending = torch.zeros(batch, num_heads, 1, device=q.device)  # query rows not masked out entirely
    for what, rows in row_sets:
        for start in range(0, len(rows), chunk):
            idx = rows[start : start + chunk]
            logits = torch.matmul(q[:, :, _index(idx)], k_t).mul_(scale)
            if attn_mask is not None:
                logits = _apply_mask(logits, attn_mask, idx)
            here = slice(start, start + len(idx))
            if what != "all":  # keep the kept columns' logits: the normaliser overwrites the chunk
                cols = text_cols if what == "cross" else image_cols
                kept = logits[..., cols]
                kept = kept.clone() if isinstance(cols, slice) else kept
                lse = _logsumexp_(logits)
                # a row masked out everywhere has lse = -inf; +inf makes its probabilities 0, not NaN
                lse = lse.masked_fill(lse == float("-inf"), float("inf"))
                out[what][:, :, here] = _reduce(kept.sub_(lse).exp_(), reduction)
                continue
            probs, total = _softmax_(logits)
            if attn_mask is not None:
                attending += (total > 0).sum(dim=2)
            if mass is not None:
                mass += probs.sum(dim=2)
            if "full" in out:
                out["full"][:, :, here] = _reduce(probs, reduction)
            img_rows, txt_rows = is_image[idx], is_text[idx]
            if "cross" in out and img_rows.any():
                out["cross"][:, :, image_row[idx[img_rows]]] = _reduce(
                    probs[:, :, img_rows][..., text_cols], reduction
                )
            if "text_to_image" in out and txt_rows.any():
                rows_out = text_row[idx[txt_rows]]
                out["text_to_image"][:, :, rows_out] = _reduce(
                    probs[:, :, txt_rows][..., image_cols], reduction
                )

    if mass is not None:
        rows_attending = attending.clamp(min=1) if attn_mask is not None else n_query
        out["key_mass"] = _reduce(mass / rows_attending, reduction)
    return out


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp ``(..., 1)`` of ``logits``, which it overwrites.

    In place, in three passes: ``torch.logsumexp`` allocates and makes several more, and on
    the CPU costs more than the attention kernel itself.
    """
    peak = logits.amax(dim=-1, keepdim=True)
    peak = peak.masked_fill(peak == float("-inf"), 0.0)  # a row masked out everywhere sums to 0
    return logits.sub_(peak).exp_().sum(dim=-1, keepdim=True).log_().add_(peak)


def _softmax_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax of ``logits`` in place, and each row's sum of exponentials ``(..., 1)``.

    A row masked out everywhere has sum 0 and probabilities 0 (not NaN).
    """
    peak = logits.amax(dim=-1, keepdim=True)
    peak = peak.masked_fill(peak == float("-inf"), 0.0)
    probs = logits.sub_(peak).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    return probs.div_(total.masked_fill(total == 0, 1.0)), total


def _index(positions: torch.Tensor) -> slice | torch.Tensor:
    """A slice for contiguous ascending positions (a view, no copy), else the positions themselves."""
    if len(positions) and int(positions[-1]) - int(positions[0]) + 1 == len(positions):
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


def _reduce(x: torch.Tensor, reduction: str | None) -> torch.Tensor:
    if reduction is None:
        return x
    if reduction == "mean":
        return x.mean(dim=1, keepdim=True)
    return x.amax(dim=1, keepdim=True)


def _apply_mask(logits: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Add an SDPA-style mask (boolean keep-mask or additive) to a chunk of query rows."""
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[-2] != 1:
        mask = mask[..., rows, :]
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.float()
