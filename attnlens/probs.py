"""Attention probabilities from a row normaliser: only what is kept, never an ``N × N`` matrix.

Every kept variable follows from the query and key tensors of one attention call and the
log-sum-exp of each query row, ``lse_q = log Σ_k exp(q·k·s + mask[q, k])``:

- ``P[q, k] = exp(q·k·s + mask[q, k] − lse_q)`` for any block of rows and columns, in
  ``O(rows · cols · head_dim)``: ``cross`` (image rows, text columns), ``text_to_image`` and,
  on request, ``full`` in chunks of rows (written to a :class:`FullSink` as they are made);
- the incoming mass ``Σ_q P[q, k] = exp(lse′_k)``, where ``lse′`` is the log-sum-exp of one
  *reverse* call, keys as queries and queries as keys, with ``−lse_q`` added to the logits of
  original query ``q`` (:func:`incoming_mass`);
- ``lse`` itself comes from the attention kernel (:mod:`attnlens.kernels`); where no kernel
  gives it (a backend without one, the math fallback), one chunked pass recomputes it
  (:func:`recompute`), and the same pass sums the incoming mass.

All math runs in float32 whatever the model's dtype. Tensors use SDPA's layout,
``(batch, heads, seq, head_dim)``; masks are SDPA's: boolean (True = attend) or additive,
broadcastable to ``(batch, heads, query, key)``. A query row the mask excludes from every key
has probabilities 0 (not NaN) and does not count in ``key_mass``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from . import kernels

__all__ = ["FullSink", "Redirect", "attention_slices", "incoming_mass", "placed_slices", "recompute"]

#: where a normaliser came from when no kernel gave it, as the Dataset's ``capture_paths`` names it
RECOMPUTE = "recompute"
#: ``key_mass`` summed by one pass over the query rows, given the kernel's ``lse``
ROWS_PASS = "pass over rows"
#: whether :func:`incoming_mass` makes one reverse kernel call by default (else: one pass over the rows)
REVERSE_CALL = True


class FullSink(Protocol):
    """Where the rows of ``full`` go as they are computed (see :class:`~attnlens.recorder.Recorder`).

    ``write(rows, cols, values)``: ``values`` ``(batch, head, len(rows), len(cols))`` are the
    probabilities of query rows ``rows`` and key columns ``cols`` (each a slice or a 1-D index
    tensor into the sink's own ``(query_all, key)`` axes). Every entry is written once.
    """

    def write(self, rows: slice | torch.Tensor, cols: slice | torch.Tensor, values: torch.Tensor) -> None: ...


class TensorSink:
    """The default :class:`FullSink`: a preallocated tensor ``(batch, head, query_all, key)``.

    ``batch`` selects the rows of the forward a call holds (Mochi attends one row per call).
    """

    def __init__(self, tensor: torch.Tensor, batch: slice = slice(None)) -> None:
        self.tensor = tensor
        self.batch = batch

    def write(self, rows: slice | torch.Tensor, cols: slice | torch.Tensor, values: torch.Tensor) -> None:
        target = self.tensor[self.batch]
        values = values.to(device=target.device, dtype=target.dtype, non_blocking=True)
        if isinstance(rows, torch.Tensor) and isinstance(cols, torch.Tensor):
            target[:, :, rows.to(target.device)[:, None], cols.to(target.device)[None, :]] = values
        else:
            target[:, :, _on(rows, target.device), _on(cols, target.device)] = values


class _Placed:
    """A sink seen through a call's positions: local rows and columns map to joint ones."""

    def __init__(self, sink: FullSink, rows: torch.Tensor, cols: torch.Tensor) -> None:
        self.sink, self.rows, self.cols = sink, rows, cols

    def write(self, rows: slice | torch.Tensor, cols: slice | torch.Tensor, values: torch.Tensor) -> None:
        self.sink.write(
            self.rows[_on(rows, self.rows.device)], self.cols[_on(cols, self.cols.device)], values
        )


@dataclass
class Redirect:
    """The linear edit of :func:`attnlens.redirect`: ``P′ = P · keep + m_q · share``.

    Attributes:
        keep: ``(batch, key)`` float, 0 on the keys whose mass moves, 1 elsewhere.
        share: ``(batch, key)`` float, ``1/|O|`` on the receiving keys, 0 elsewhere.
    """

    keep: torch.Tensor
    share: torch.Tensor


def attention_slices(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    text: torch.Tensor,
    image: torch.Tensor,
    keep: Sequence[str],
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    heads: Sequence[int] | None = None,
    reduction: str | None = None,
    chunk_bytes: int = 64 * 2**20,
    key_text: torch.Tensor | None = None,
    key_image: torch.Tensor | None = None,
    full: FullSink | None = None,
    redirect: Redirect | None = None,
    reverse: bool | None = None,
    paths: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Attention probabilities restricted to what ``keep`` asks for, without an ``N × N`` matrix.

    Args:
        query: ``(batch, heads, query, head_dim)``, post-norm and post-RoPE, as SDPA takes it.
        key: ``(batch, heads, key, head_dim)``.
        text: positions of the text tokens among the queries, ascending, ``(query_text,)``.
        image: positions of the image/video tokens among the queries, ascending, ``(query,)``.
        keep: any of ``cross``, ``text_to_image``, ``key_mass``, ``full``.
        scale: logit scale, default ``1/sqrt(head_dim)``.
        attn_mask: SDPA's mask of the call, boolean (True = attend) or additive.
        lse: the kernel's log-sum-exp of each query row, ``(batch, heads, query)`` (all heads);
            ``None`` recomputes it in one chunked pass.
        heads: head indices to keep (default all).
        reduction: ``"mean"`` or ``"max"`` over the kept heads, or ``None``.
        chunk_bytes: budget of one chunk's float32 temporaries.
        key_text: positions of the text tokens among the keys when they are not the queries'
            (cross-attention); default ``text``.
        key_image: positions of the image/video tokens among the keys; default ``image``.
        full: where the rows of ``full`` go (default: a new tensor, returned as ``"full"``).
        redirect: the linear edit of a redirect intervention, applied per head before the
            reduction.
        reverse: whether :func:`incoming_mass` sums ``key_mass`` by one reverse kernel call (the
            default) or by one pass over the rows.
        paths: filled with where the normalisers came from: ``{"lse": "kernel" | "recompute",
            "key_mass": "reverse call:<kernel>" | "pass over rows" | "recompute"}``.

    Returns:
        float32 tensors: ``cross`` ``(batch, head, query, key_text)``; ``text_to_image``
        ``(batch, head, query_text, key_image)``; ``key_mass`` ``(batch, head, key)``, the mean
        over the query rows that attend; ``full`` ``(batch, head, query_all, key)``; ``head``
        has size 1 under a reduction.

    >>> q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    >>> out = attention_slices(q, k, text=torch.arange(2), image=torch.arange(2, 5), keep=["cross", "full"])
    >>> out["cross"].shape, out["full"].shape
    (torch.Size([1, 2, 3, 2]), torch.Size([1, 2, 5, 5]))
    >>> bool(torch.allclose(out["full"].sum(-1), torch.ones(1, 2, 5)))
    True
    """
    if query.ndim != 4 or key.ndim != 4 or query.shape[:2] != key.shape[:2] or query.shape[3] != key.shape[3]:
        raise ValueError(
            "query and key must be (batch, heads, seq, head_dim) with matching batch, heads and head_dim; "
            f"got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    n_query, n_key = query.shape[2], key.shape[2]
    if n_query != n_key and key_text is None and key_image is None:
        raise ValueError(
            f"joint attention needs as many queries as keys; got {n_query} and {n_key} "
            "(give key_text/key_image for a call whose keys are another sequence)"
        )
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    device = query.device
    mask = _mask4(attn_mask)
    if heads is not None:
        index = torch.as_tensor(list(heads), device=device)
        query, key = query.index_select(1, index), key.index_select(1, index)
        lse = None if lse is None else lse.index_select(1, index.to(lse.device))
        if mask is not None and mask.shape[1] > 1:
            mask = mask.index_select(1, index.to(mask.device))
    attends = _attending_rows(mask, n_query, device)
    mass = None
    if lse is None:
        lse, mass = recompute(
            query, key, scale=scale, attn_mask=mask, chunk_bytes=chunk_bytes, mass="key_mass" in keep
        )
        lse_path = mass_path = RECOMPUTE
    else:
        lse = lse.float().masked_fill(~attends, float("inf"))  # rows masked out everywhere: P = 0
        lse_path, mass_path = "kernel", None
    text, image = text.to(device), image.to(device)
    text_cols = text if key_text is None else key_text.to(device)
    image_cols = image if key_image is None else key_image.to(device)
    batch, n_heads = query.shape[:2]
    moved = None
    if redirect is not None:
        keep_cols = redirect.keep.to(device).float()
        dropped = (keep_cols == 0).any(0).nonzero().flatten()
        moved = torch.zeros(batch, n_heads, n_query, device=device)
        if len(dropped):
            for rows, values in _blocks(query, key, lse, mask, scale, None, dropped, chunk_bytes):
                moved[:, :, rows] = (values * (1 - keep_cols[:, None, None, dropped])).sum(-1)

    def edited(values: torch.Tensor, rows: slice | torch.Tensor, cols: slice | torch.Tensor) -> torch.Tensor:
        if redirect is None:
            return _reduce(values, reduction)
        k = redirect.keep.to(device).float()[:, None, None, cols]
        s = redirect.share.to(device).float()[:, None, None, cols]
        return _reduce(values * k + moved[:, :, rows, None] * s, reduction)

    out: dict[str, torch.Tensor] = {}
    heads_out = 1 if reduction is not None else n_heads
    blocks = {"cross": (image, text_cols), "text_to_image": (text, image_cols)}
    for name, (rows, cols) in blocks.items():
        if name not in keep:
            continue
        for local, values in _blocks(query, key, lse, mask, scale, rows, cols, chunk_bytes):
            values = edited(values, rows[local], cols)
            if local == slice(0, len(rows)):  # one chunk: its probabilities are the result, no copy
                out[name] = values
                continue
            if name not in out:
                out[name] = query.new_empty(batch, heads_out, len(rows), len(cols), dtype=torch.float32)
            out[name][:, :, local] = values
        if name not in out:  # no rows or no columns
            out[name] = query.new_empty(batch, heads_out, len(rows), len(cols), dtype=torch.float32)
    if "full" in keep:
        sink = full
        if sink is None:
            out["full"] = query.new_empty(batch, heads_out, n_query, n_key, dtype=torch.float32)
            sink = TensorSink(out["full"])
        everything = torch.arange(n_key, device=device)
        for local, values in _blocks(query, key, lse, mask, scale, None, None, chunk_bytes):
            sink.write(local, slice(None), edited(values, local, everything))
    if "key_mass" in keep:
        if mass is None:
            mass, mass_path = incoming_mass(
                query, key, lse, scale=scale, attn_mask=mask, chunk_bytes=chunk_bytes, reverse=reverse
            )
        mass = mass / attends.sum(-1, keepdim=True).clamp(min=1)
        if redirect is not None:
            mean_moved = (moved * attends).sum(-1, keepdim=True) / attends.sum(-1, keepdim=True).clamp(min=1)
            mass = (
                mass * redirect.keep.to(device).float()[:, None]
                + mean_moved * redirect.share.to(device).float()[:, None]
            )
        out["key_mass"] = _reduce(mass, reduction)
    if paths is not None:
        paths["lse"] = lse_path
        if "key_mass" in keep:
            paths["key_mass"] = mass_path
    return out


def recompute(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float,
    attn_mask: torch.Tensor | None = None,
    chunk_bytes: int = 64 * 2**20,
    lse: torch.Tensor | None = None,
    mass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fallback: one chunked pass over query rows for ``lse`` and, if asked, the incoming mass.

    Args:
        query: ``(batch, heads, query, head_dim)``.
        key: ``(batch, heads, key, head_dim)``.
        scale: logit scale.
        attn_mask: the call's mask, 4-D.
        chunk_bytes: budget of one chunk's float32 temporaries.
        lse: a known normaliser ``(batch, heads, query)``: the pass then sums the mass only.
        mass: whether to sum ``Σ_q P[q, k]``.

    Returns:
        ``(lse, mass)``: ``(batch, heads, query)`` (``+inf`` on rows masked out everywhere) and
        ``(batch, heads, key)`` or ``None``.
    """
    batch, n_heads, n_query = query.shape[:3]
    known = lse is not None
    lse = lse if known else query.new_empty(batch, n_heads, n_query, dtype=torch.float32)
    total = torch.zeros(batch, n_heads, key.shape[2], device=query.device) if mass else None
    k_t = key.float().transpose(-1, -2)
    chunk = _rows_per_chunk(chunk_bytes, batch * n_heads * key.shape[2])
    for start in range(0, n_query, chunk):
        rows = slice(start, min(start + chunk, n_query))
        logits = _masked(torch.matmul(query[:, :, rows].float(), k_t).mul_(scale), attn_mask, rows, None)
        if not known:
            peak = logits.amax(dim=-1, keepdim=True)
            peak = peak.masked_fill(peak == float("-inf"), 0.0)  # a row masked out everywhere sums to 0
            exps = logits.sub_(peak).exp_()
            sums = exps.sum(dim=-1, keepdim=True)
            empty = sums == 0
            lse[:, :, rows] = (sums.log() + peak).masked_fill_(empty, float("inf")).squeeze(-1)
            if total is not None:
                total += exps.div_(sums.masked_fill_(empty, 1.0)).sum(dim=2)
        elif total is not None:
            total += logits.sub_(lse[:, :, rows, None]).exp_().sum(dim=2)
    return lse, total


def incoming_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    attn_mask: torch.Tensor | None = None,
    chunk_bytes: int = 64 * 2**20,
    reverse: bool | None = None,
) -> tuple[torch.Tensor, str]:
    """``Σ_q P[q, k]`` ``(batch, heads, key)`` given the normaliser ``lse``, and the path it took.

    Two exact ways, chosen by ``reverse`` (default: the reverse call):

    - one *reverse* kernel call attends from the keys to the queries with ``−lse_q`` added to
      the logits of query ``q``; its log-sum-exp is ``lse′_k = log Σ_q exp(q·k·s + mask[q, k]
      − lse_q)`` (path ``"reverse call:<kernel>"``). A mask that depends on the key only
      (padding) is a factor ``exp(mask[k])`` outside the sum; one that depends on the query
      only joins the bias; a full mask is passed transposed. In single or double precision
      the bias is an additive mask; in half precision, where a mask would round it, it rides
      on three extra head-dim columns, ``hi + mid + lo`` in the query's dtype, which the
      kernel multiplies by 1 and sums in float32. Where no fused kernel takes the call, the
      pass runs instead.
    - one pass over chunks of query rows sums ``exp(q·k·s − lse_q)``: a matrix product with
      ``−lse`` as its initial value, and an exponential (path ``"pass over rows"``). It skips
      the kernel's product with the values, but holds a chunk of logits in memory, where the
      kernel keeps them in its tiles: ``benchmarks/capture_overhead.py`` measures both.

    ``lse`` is ``+inf`` on rows masked out everywhere; they add nothing.

    >>> q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    >>> lse = torch.logsumexp(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    >>> by_pass, path = incoming_mass(q, k, lse, scale=8**-0.5, reverse=False)
    >>> by_call, kernel = incoming_mass(q, k, lse, scale=8**-0.5, reverse=True)
    >>> path, kernel, bool(torch.allclose(by_pass, by_call, atol=1e-5))
    ('pass over rows', 'reverse call:flash_attention_for_cpu', True)
    >>> bool(torch.allclose(by_pass.sum(-1), torch.tensor(6.0)))  # each of the 6 query rows gives 1 in all
    True
    """
    mask = _mask4(attn_mask)
    if reverse is None:
        reverse = REVERSE_CALL
    found = _reverse_call(query, key, lse, scale, mask) if reverse else None
    if found is not None:
        return found
    total = query.new_zeros(*query.shape[:2], key.shape[2], dtype=torch.float32)
    for _, values in _blocks(query, key, lse, mask, scale, None, None, chunk_bytes):
        total += values.sum(dim=2)
    return total, ROWS_PASS


def _reverse_call(
    query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> tuple[torch.Tensor, str] | None:
    """:func:`incoming_mass` by one reverse kernel call, or ``None`` where no kernel takes it."""
    attends = torch.isfinite(lse)
    key_part = query_part = full = None
    if mask is not None:
        additive = kernels.additive_mask(mask, torch.float32)
        if additive.shape[2] == 1:
            key_part = additive[:, :, 0]  # (batch|1, heads|1, key)
        elif additive.shape[3] == 1:
            query_part = additive[..., 0]  # (batch|1, heads|1, query)
        else:
            full = additive
    bias = -lse if query_part is None else query_part.float() - lse
    bias = torch.where(attends, bias, torch.full_like(bias, -1e4)).nan_to_num_(neginf=-1e4)
    if query.dtype in (torch.float32, torch.float64) and full is None:
        found = kernels.logsumexp(key, query, bias[:, :, None, :].to(query.dtype), scale=scale)
    else:
        found = _with_bias_columns(query, key, bias, scale, full)
    if found is None:
        return None
    lse_rev, name = found
    if key_part is not None:
        lse_rev = lse_rev + key_part.float()
    if full is not None:  # a key no query may attend to has no mass (the kernel's lse of an empty row is 0)
        lse_rev = lse_rev.masked_fill(~(full > float("-inf")).any(dim=2), float("-inf"))
    return lse_rev.float().exp(), f"reverse call:{name}"


def placed_slices(
    query: torch.Tensor,
    key: torch.Tensor,
    positions: tuple[torch.Tensor, torch.Tensor],
    *,
    text: torch.Tensor,
    image: torch.Tensor,
    seq_len: int,
    keep: Sequence[str],
    n_heads: int,
    full: FullSink | None = None,
    **options: object,
) -> dict[str, torch.Tensor]:
    """:func:`attention_slices` of a call over part of the joint sequence, placed into joint-size arrays.

    ``positions`` are the joint positions of the call's queries and keys; ``text`` and
    ``image`` those of the joint sequence's text and image tokens. What the call does not
    cover is NaN (an image-only layer has no image → text probabilities); ``full`` is written
    to the sink at joint positions, which must be NaN beforehand. ``options`` are those of
    :func:`attention_slices`.
    """
    q_pos, k_pos = (p.to(torch.long).cpu() for p in positions)
    n_text, n_image = len(text), len(image)
    if len(q_pos) != query.shape[2] or len(k_pos) != key.shape[2]:  # the adapter could not place the call
        q_pos = k_pos = torch.empty(0, dtype=torch.long)
        query, key = query[:, :, :0], key[:, :, :0]
    text_at = torch.full((seq_len,), -1, dtype=torch.long)
    text_at[text.cpu()] = torch.arange(n_text)
    image_at = torch.full((seq_len,), -1, dtype=torch.long)
    image_at[image.cpu()] = torch.arange(n_image)
    q_txt, q_img = (text_at[q_pos] >= 0).nonzero().flatten(), (image_at[q_pos] >= 0).nonzero().flatten()
    k_txt, k_img = (text_at[k_pos] >= 0).nonzero().flatten(), (image_at[k_pos] >= 0).nonzero().flatten()
    computed = {var for var in keep if var != "full" or full is not None}
    redirect = options.get("redirect")
    if isinstance(redirect, Redirect):  # the edit over the call's own keys
        where = k_pos.to(redirect.keep.device)
        options = {**options, "redirect": Redirect(redirect.keep[:, where], redirect.share[:, where])}
    out = {}
    if len(q_pos) and len(k_pos):
        sink = _Placed(full, q_pos.to(query.device), k_pos.to(query.device)) if full is not None else None
        out = attention_slices(
            query,
            key,
            text=q_txt,
            image=q_img,
            key_text=k_txt,
            key_image=k_img,
            keep=tuple(computed),
            full=sink,
            **options,  # type: ignore[arg-type]
        )
    batch, device = query.shape[0], query.device
    targets = {  # variable: (joint shape, joint rows, joint columns)
        "cross": ((n_image, n_text), image_at[q_pos[q_img]], text_at[k_pos[k_txt]]),
        "text_to_image": ((n_text, n_image), text_at[q_pos[q_txt]], image_at[k_pos[k_img]]),
    }
    placed: dict[str, torch.Tensor] = {}
    for var in computed - {"full"}:
        if var == "key_mass":
            whole = torch.full((batch, n_heads, seq_len), float("nan"), device=device)
            if var in out:
                whole[:, :, k_pos.to(device)] = out[var]
            placed[var] = whole
            continue
        shape, rows, cols = targets[var]
        whole = torch.full((batch, n_heads, *shape), float("nan"), device=device)
        if var in out and len(rows) and len(cols):
            whole[:, :, rows.to(device)[:, None], cols.to(device)[None, :]] = out[var]
        placed[var] = whole
    return placed


# -- internals ------------------------------------------------------------------------------------


def _blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
    chunk_bytes: int,
):
    """``P[rows, cols]`` in chunks of rows: ``(local row slice, (batch, heads, chunk, cols) float32)``.

    ``rows``/``cols`` are positions among the call's queries/keys (``None``: all of them).
    """
    batch, n_heads, _, dim = query.shape
    n_rows = query.shape[2] if rows is None else len(rows)
    n_cols = key.shape[2] if cols is None else len(cols)
    if not n_rows or not n_cols:
        return
    row_index = _index(rows)
    k_t = key[:, :, _index(cols)].float().transpose(-1, -2).reshape(batch * n_heads, dim, n_cols)
    neg_lse = lse.neg()
    # one float32 temporary per element: the logits, turned into probabilities in place
    chunk = max(1, chunk_bytes // (4 * batch * n_heads * n_cols))
    for start in range(0, n_rows, chunk):
        local = slice(start, min(start + chunk, n_rows))
        if isinstance(row_index, slice):  # contiguous rows: views, no copies
            first = row_index.start or 0
            here: slice | torch.Tensor = slice(first + local.start, first + local.stop)
        else:
            here = row_index[local]
        q_s = query[:, :, here].float().mul(scale).reshape(batch * n_heads, -1, dim)
        # q·k·s − lse in one matrix product: the normaliser rides in as the product's initial value
        logits = torch.baddbmm(neg_lse[:, :, here].reshape(batch * n_heads, -1, 1), q_s, k_t)
        logits = _masked(logits.view(batch, n_heads, -1, n_cols), mask, here, cols)
        yield local, logits.exp_()


def _with_bias_columns(
    query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor, scale: float, full: torch.Tensor | None
) -> tuple[torch.Tensor, str] | None:
    """The reverse call with the float32 bias split over three head-dim columns of the keys' dtype."""
    # half precision overflows where float32 does not; exp(logit − 30000·s) is 0 all the same
    parts, rest = [], (bias / scale).clamp(min=torch.finfo(query.dtype).min / 2)
    for _ in range(3):
        part = rest.to(query.dtype)
        parts.append(part)
        rest = rest - part.float()
    # reverse keys (the original queries) carry the bias; reverse queries (the original keys) a 1
    pad = -(query.shape[-1] + 3) % 8
    zeros = query.new_zeros(*query.shape[:3], pad)
    rev_keys = torch.cat([query, torch.stack(parts, dim=-1), zeros], dim=-1)
    ones = key.new_ones(*key.shape[:3], 3)
    rev_queries = torch.cat([key, ones, key.new_zeros(*key.shape[:3], pad)], dim=-1)
    mask = None if full is None else full.transpose(-1, -2).to(query.dtype)
    return kernels.logsumexp(rev_queries, rev_keys, mask, scale=scale)


def _mask4(mask: torch.Tensor | None) -> torch.Tensor | None:
    """An SDPA mask with four dims ``(batch|1, heads|1, query|1, key|1)``."""
    if mask is None:
        return None
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    return mask


def _attending_rows(mask: torch.Tensor | None, n_query: int, device: torch.device) -> torch.Tensor:
    """``(batch|1, heads|1, query)`` bool: the query rows the mask leaves at least one key."""
    if mask is None:
        return torch.ones(1, 1, n_query, dtype=torch.bool, device=device)
    finite = mask if mask.dtype == torch.bool else mask > float("-inf")
    return finite.any(dim=-1).expand(*finite.shape[:2], n_query).to(device)


def _masked(
    logits: torch.Tensor, mask: torch.Tensor | None, rows: slice | torch.Tensor, cols: torch.Tensor | None
) -> torch.Tensor:
    """Apply an SDPA mask (4-D) to the logits of query rows ``rows`` and key columns ``cols``."""
    if mask is None:
        return logits
    if mask.shape[2] != 1:
        mask = mask[:, :, _on(rows, mask.device)]
    if cols is not None and mask.shape[3] != 1:
        mask = mask[..., _on(_index(cols), mask.device)]
    mask = mask.to(logits.device)
    if mask.dtype == torch.bool:
        return logits.masked_fill_(~mask, float("-inf"))
    return logits.add_(mask.float())


def _index(positions: torch.Tensor | None) -> slice | torch.Tensor:
    """A slice for contiguous ascending positions (a view, no copy), else the positions themselves."""
    if positions is None:
        return slice(None)
    if len(positions) and int(positions[-1]) - int(positions[0]) + 1 == len(positions):
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


def _on(index: slice | torch.Tensor, device: torch.device) -> slice | torch.Tensor:
    return index.to(device) if isinstance(index, torch.Tensor) else index


def _rows_per_chunk(chunk_bytes: int, row_elements: int) -> int:
    # logits, their exp and a temporary: three float32 values per element of a row
    return max(1, chunk_bytes // (3 * 4 * max(1, row_elements)))


def _reduce(x: torch.Tensor, reduction: str | None) -> torch.Tensor:
    if reduction is None:
        return x
    if reduction == "mean":
        return x.mean(dim=1, keepdim=True)
    return x.amax(dim=1, keepdim=True)
