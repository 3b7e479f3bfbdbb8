"""The attention kernel SDPA would run, called directly so that it also returns its log-sum-exp.

``F.scaled_dot_product_attention`` picks a fused kernel (``torch._fused_sdp_choice``) and
returns its output only, yet every fused kernel computes each query row's log-sum-exp
``lse_q = log Σ_k exp(q·k·s + mask[q, k])``, the normaliser of the row's probabilities.
:func:`attention` calls the kernel SDPA would choose, with the arguments SDPA would pass it,
so that the output is SDPA's bit for bit and the normaliser comes for free:

======  ================  ===============================================================
device  SDPA's choice     called here
======  ================  ===============================================================
CPU     flash             ``aten._scaled_dot_product_flash_attention_for_cpu``
CUDA    flash             ``aten._scaled_dot_product_flash_attention`` (head dim padded to 8)
CUDA    memory-efficient  ``aten._scaled_dot_product_efficient_attention``, with the lse
CUDA    cuDNN             ``aten._scaled_dot_product_cudnn_attention``, with the lse
======  ================  ===============================================================

Anything else (the math backend, dropout, grouped key heads, nested tensors, a backend
chosen by ``torch.nn.attention.sdpa_kernel``) runs SDPA itself and returns no normaliser:
the caller recomputes it. The first call of each configuration (device, kernel, dtype, kind
of mask) is checked once per process: its output must equal SDPA's bit for bit and its
log-sum-exp a float64 one on a few rows. A configuration that fails is not used again, and a
:class:`KernelMismatchWarning` says so, so that a torch version whose SDPA prepares its
arguments differently costs speed, never exactness.

>>> q = k = v = torch.randn(1, 2, 5, 8)
>>> out, lse, kernel = attention(q, k, v)
>>> torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v)), tuple(lse.shape), kernel
(True, (1, 2, 5), 'flash_attention_for_cpu')
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["KernelMismatchWarning", "attention", "logsumexp"]

# the function itself, taken before anything wraps F.scaled_dot_product_attention (a test's oracle,
# another tool): attnlens' interception recognises it, and its reference calls bypass the wrappers
_SDPA = F.scaled_dot_product_attention

#: SDPA's backends, as torch._fused_sdp_choice numbers them (torch.nn.attention.SDPBackend)
_FLASH, _EFFICIENT, _CUDNN = 1, 2, 3
#: rows of the float64 log-sum-exp a kernel's normaliser is checked against, once
_CHECKED_ROWS = 8

Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class KernelMismatchWarning(UserWarning):
    """A kernel did not reproduce SDPA (or a float64 normaliser): attnlens recomputes instead."""


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """SDPA's output, bit for bit, with the kernel's log-sum-exp of each query row.

    Args:
        query: ``(batch, heads, query, head_dim)``, as ``F.scaled_dot_product_attention`` takes it.
        key: ``(batch, heads, key, head_dim)``.
        value: ``(batch, heads, key, value_dim)``.
        attn_mask: SDPA's mask, boolean (True = attend) or additive.
        dropout_p: as SDPA takes it (any dropout: SDPA runs itself).
        is_causal: as SDPA takes it.
        scale: logit scale, default ``1/sqrt(head_dim)``.
        enable_gqa: as SDPA takes it (grouped key heads: SDPA runs itself).

    Returns:
        ``(output, lse, kernel)``: SDPA's output ``(batch, heads, query, value_dim)``; the
        float32 log-sum-exp ``(batch, heads, query)`` of ``q·kᵀ·s + mask``, or ``None`` when no
        kernel gives it; and the kernel's name (``"sdpa"`` when SDPA ran itself).
    """

    def sdpa() -> torch.Tensor:
        return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    found = _choose(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if found is not None:
        name, kernel = found
        out, lse = kernel(query, key, value, attn_mask, is_causal, scale)
        if _trusted(name, query, key, attn_mask, is_causal, scale, lse, out, sdpa):
            return out, lse, name
    return sdpa(), None, "sdpa"


def logsumexp(
    query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None
) -> tuple[torch.Tensor, str] | None:
    """The log-sum-exp ``(batch, heads, query)`` of ``q·kᵀ·s + mask`` from a fused kernel, and its name.

    The kernel's output is not used (the keys serve as values). ``None`` when no fused
    kernel takes these inputs.

    >>> q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8)
    >>> lse, kernel = logsumexp(q, k)
    >>> bool(torch.allclose(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 8**0.5, dim=-1), atol=1e-5))
    True
    """
    found = _choose(query, key, key, attn_mask, 0.0, False, scale, False)
    if found is None:
        return None
    name, kernel = found
    _, lse = kernel(query, key, key, attn_mask, False, scale)
    if not _trusted(name, query, key, attn_mask, False, scale, lse):
        return None
    return lse, name


# -- choosing and calling the kernel ------------------------------------------------------------


def _choose(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> tuple[str, Kernel] | None:
    """The kernel SDPA would run on these inputs, when it is one that returns the log-sum-exp."""
    if dropout_p > 0.0 or query.is_nested or query.ndim != 4 or key.shape[1] != query.shape[1]:
        return None
    try:
        choice = torch._fused_sdp_choice(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    except RuntimeError:
        return None
    return _KERNELS.get((query.device.type, int(choice)))


def _flash_cpu(q, k, v, mask, is_causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=additive_mask(mask, q.dtype), scale=scale
    )


def _flash_cuda(q, k, v, mask, is_causal, scale):
    # SDPA pads the head dim to a multiple of 8, with the scale of the unpadded one, and slices back
    size = q.shape[-1]
    scale = 1.0 / math.sqrt(size) if scale is None else scale
    pad = -size % 8
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, is_causal, False, scale=scale
    )
    return out[..., :size], lse


def _efficient_cuda(q, k, v, mask, is_causal, scale):
    bias = additive_mask(mask, q.dtype)
    if bias is not None:  # as SDPA: the bias padded to an aligned stride, then expanded
        if not (all(s % 8 == 0 for s in bias.stride()[:-1]) and bias.stride(-1) == 1):
            n = bias.shape[-1]
            bias = F.pad(bias, (0, 8 - n % 8))[..., :n]
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, is_causal, scale=scale
    )
    return out, lse[..., : q.shape[2]]  # the kernel pads its lse to a multiple of 32 rows


def _cudnn_cuda(q, k, v, mask, is_causal, scale):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, additive_mask(mask, q.dtype, -65504.0), True, 0.0, is_causal, False, scale=scale
    )
    return out, lse.reshape(q.shape[0], q.shape[1], -1)[..., : q.shape[2]]


_KERNELS: dict[tuple[str, int], tuple[str, Kernel]] = {
    ("cpu", _FLASH): ("flash_attention_for_cpu", _flash_cpu),
    ("cuda", _FLASH): ("flash_attention", _flash_cuda),
    ("cuda", _EFFICIENT): ("efficient_attention", _efficient_cuda),
    ("cuda", _CUDNN): ("cudnn_attention", _cudnn_cuda),
}


def additive_mask(
    mask: torch.Tensor | None, dtype: torch.dtype, masked: float = float("-inf")
) -> torch.Tensor | None:
    """A boolean mask (True = attend) as the additive one SDPA makes of it; other masks unchanged."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask.logical_not(), masked, torch.zeros((), dtype=dtype, device=mask.device))


# -- the once-per-configuration check -----------------------------------------------------------

_VERDICTS: dict[tuple, bool] = {}


def _trusted(
    name: str,
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    lse: torch.Tensor,
    out: torch.Tensor | None = None,
    reference: Callable[[], torch.Tensor] | None = None,
) -> bool:
    """Whether this kernel configuration reproduces SDPA (when ``out`` is given) and a float64 lse."""
    config = (
        name,
        query.device.type,
        query.dtype,
        None if mask is None else mask.dtype,
        is_causal,
        out is None,
    )
    verdict = _VERDICTS.get(config)
    if verdict is None:
        with torch.no_grad():
            same = out is None or reference is None or _same(out, reference())
            close = _lse_close(lse, query, key, mask, is_causal, scale)
        verdict = _VERDICTS[config] = same and close
        if not verdict:
            warnings.warn(
                f"the {name} kernel on {query.device.type} ({query.dtype}, mask {config[3]}) "
                f"{'does not reproduce SDPA bit for bit' if not same else 'returns another log-sum-exp'} "
                "in this torch version: attnlens recomputes the normaliser instead (slower, as exact)",
                KernelMismatchWarning,
                stacklevel=4,
            )
    return verdict


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _lse_close(
    lse: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> bool:
    """``lse`` against a float64 log-sum-exp of the first few query rows (rows masked everywhere aside)."""
    rows = min(_CHECKED_ROWS, query.shape[2])
    q = query[:, :, :rows].double()
    s = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    logits = q @ key.double().transpose(-1, -2) * s
    if is_causal:
        logits = logits.masked_fill(torch.ones_like(logits, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        m = mask if mask.ndim == 4 else mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        m = m[:, :, :rows] if m.shape[2] > 1 else m
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.double()
    want = torch.logsumexp(logits, dim=-1)
    if lse.shape != want.shape[:2] + lse.shape[2:] or lse.shape[2] < rows:
        return False
    got = lse[:, :, :rows].double()
    finite = torch.isfinite(want)
    return bool(((got - want).abs()[finite] <= 1e-3 * want.abs()[finite].clamp(min=1.0)).all())
