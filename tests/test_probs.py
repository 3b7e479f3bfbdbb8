"""The kernel's log-sum-exp and the probabilities that follow from it, against float64 textbook attention.

Every path a normaliser can take is checked: the kernel's ``lse`` (CPU flash attention), the
incoming mass by one reverse kernel call or by one pass over the rows, and the chunked
recompute where no kernel gives an ``lse``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnlens import kernels, probs

ATOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    """Each test sees kernel configurations checked anew."""
    monkeypatch.setattr(kernels, "_VERDICTS", {})


def _qkv(batch=2, heads=3, n_query=23, n_key=23, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g) for n in (n_query, n_key, n_key))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _textbook(q, k, mask=None, scale=None):
    """float64 ``softmax(q·kᵀ·s + mask)``, rows masked out everywhere 0."""
    logits = (
        q.double() @ k.double().transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    )
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask.double()
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


MASKS = {
    "none": lambda b, n, m: None,
    "key padding (bool)": lambda b, n, m: (torch.arange(m) < torch.tensor([[m], [m - 5]]))[:, None, None, :],
    "full, a row masked everywhere (bool)": lambda b, n, m: _full_mask(b, n, m),
    "additive (float)": lambda b, n, m: torch.randn(b, 1, n, m, generator=torch.Generator().manual_seed(3)),
    "query only (float)": lambda b, n, m: torch.where(torch.arange(n) == 4, -math.inf, 0.5)[:, None],
}  # fmt: skip


def _full_mask(b: int, n: int, m: int) -> torch.Tensor:
    mask = torch.rand(b, 1, n, m, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[0, 0, 5] = False  # a query row that attends to nothing
    return mask


# -- the kernel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_kernel_gives_sdpas_output_bit_for_bit_and_the_row_normaliser(mask, dtype):
    q, k, v = _qkv(n_key=19 if "full" not in mask else 23, dtype=dtype)
    m = MASKS[mask](2, q.shape[2], k.shape[2])
    m = m.to(dtype) if m is not None and m.is_floating_point() else m
    out, lse, kernel = kernels.attention(q, k, v, m, scale=0.3)
    assert kernel == "flash_attention_for_cpu"
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3))
    logits = q.double() @ k.double().transpose(-1, -2) * 0.3
    if m is not None:
        logits = logits.masked_fill(~m, -math.inf) if m.dtype == torch.bool else logits + m.double()
    want = torch.logsumexp(logits, dim=-1)
    finite = torch.isfinite(want)
    tolerance = 1e-5 if dtype != torch.bfloat16 else 1e-4
    torch.testing.assert_close(lse.double()[finite], want[finite], atol=tolerance, rtol=0)


def test_gradients_flow_through_the_kernel_as_through_sdpa():
    q, k, v = (t.requires_grad_() for t in _qkv())
    out, _, _ = kernels.attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    for got, want in zip(
        torch.autograd.grad(out.square().sum(), (q, k, v)),
        torch.autograd.grad(ref.square().sum(), (q, k, v)),
        strict=True,
    ):
        assert torch.equal(got, want)


def test_where_sdpa_picks_no_fused_kernel_it_runs_itself_and_gives_no_normaliser():
    q, k, v = _qkv()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out, lse, kernel = kernels.attention(q, k, v)
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert (lse, kernel) == (None, "sdpa")
    assert kernels.attention(q, k, v, dropout_p=0.5)[2] == "sdpa"  # random: no kernel can match it
    grouped = kernels.attention(q, k[:, :1], v[:, :1], enable_gqa=True)
    assert grouped[1] is None and grouped[0].shape == q.shape


def test_a_kernel_that_does_not_reproduce_sdpa_is_not_used_again(monkeypatch):
    name, kernel = kernels._KERNELS[("cpu", 1)]

    def off_by_a_bit(*args):
        out, lse = kernel(*args)
        return out.nextafter(torch.full_like(out, math.inf)), lse

    monkeypatch.setitem(kernels._KERNELS, ("cpu", 1), (name, off_by_a_bit))
    q, k, v = _qkv()
    with pytest.warns(kernels.KernelMismatchWarning, match="does not reproduce SDPA bit for bit"):
        out, lse, used = kernels.attention(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v)) and (lse, used) == (None, "sdpa")
    assert kernels.attention(q, k, v)[2] == "sdpa"  # decided once: no second warning, no second try


def test_a_kernel_whose_normaliser_is_not_the_log_sum_exp_is_not_used(monkeypatch):
    name, kernel = kernels._KERNELS[("cpu", 1)]
    monkeypatch.setitem(
        kernels._KERNELS, ("cpu", 1), (name, lambda *a: (kernel(*a)[0], kernel(*a)[1] / math.log(2)))
    )  # a base-2 log-sum-exp
    with pytest.warns(kernels.KernelMismatchWarning, match="another log-sum-exp"):
        assert kernels.attention(*_qkv())[1] is None


# -- probabilities from the normaliser ------------------------------------------------------------

TEXT, IMAGE = torch.arange(0, 6), torch.arange(6, 23)  # [text | image], 23 tokens


def _slices(q, k, mask=None, **options):
    return probs.attention_slices(
        q,
        k,
        text=TEXT,
        image=IMAGE,
        keep=("cross", "text_to_image", "key_mass", "full"),
        attn_mask=mask,
        **options,
    )


def _check(out, p, reduction=None):
    reduce = {
        None: lambda x: x,
        "mean": lambda x: x.mean(1, keepdim=True),
        "max": lambda x: x.amax(1, keepdim=True),
    }
    attending = (p.sum(-1) > 0).sum(-1, keepdim=True).clamp(min=1)
    want = {
        "full": p,
        "cross": p[:, :, IMAGE][..., TEXT],
        "text_to_image": p[:, :, TEXT][..., IMAGE],
        "key_mass": p.sum(2) / attending,
    }
    for var, expected in want.items():
        torch.testing.assert_close(out[var].double(), reduce[reduction](expected), atol=ATOL, rtol=0, msg=var)


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("path", ["kernel lse, pass over rows", "kernel lse, reverse call", "recompute"])
def test_every_kept_variable_equals_textbook_attention_on_every_path(mask, path):
    q, k, v = _qkv()
    m = MASKS[mask](2, 23, 23)
    lse = None if path == "recompute" else kernels.attention(q, k, v, m)[1]
    paths: dict[str, str] = {}
    for chunk_bytes in (1, 2**30):  # a row per chunk, everything at once
        out = _slices(q, k, m, lse=lse, reverse="reverse" in path, chunk_bytes=chunk_bytes, paths=paths)
        _check(out, _textbook(q, k, m))
    expected = {
        "kernel lse, pass over rows": {"lse": "kernel", "key_mass": "pass over rows"},
        "kernel lse, reverse call": {"lse": "kernel", "key_mass": "reverse call:flash_attention_for_cpu"},
        "recompute": {"lse": "recompute", "key_mass": "recompute"},
    }
    assert paths == expected[path]


@pytest.mark.parametrize("heads", [None, [2, 0]])
@pytest.mark.parametrize("reduction", [None, "mean", "max"])
def test_heads_are_selected_then_reduced(heads, reduction):
    q, k, v = _qkv()
    _, lse, _ = kernels.attention(q, k, v)
    out = _slices(q, k, lse=lse, heads=heads, reduction=reduction)
    p = _textbook(q, k)
    _check(out, p if heads is None else p[:, heads], reduction)


def test_half_precision_reverse_call_carries_the_normaliser_in_extra_columns():
    q, k, v = _qkv(dtype=torch.bfloat16, dim=24)
    for m in (None, MASKS["full, a row masked everywhere (bool)"](2, 23, 23)):
        _, lse, _ = kernels.attention(q, k, v, m)
        by_pass = _slices(q, k, m, lse=lse, reverse=False)["key_mass"]
        by_call = _slices(q, k, m, lse=lse, reverse=True)["key_mass"]
        torch.testing.assert_close(by_call, by_pass, atol=1e-6, rtol=1e-4)  # as close as bf16 kernels get
        torch.testing.assert_close(by_pass.double(), _check_mass(q, k, m), atol=1e-4, rtol=0)


def _check_mass(q, k, m):
    p = _textbook(q, k, m)
    return p.sum(2) / (p.sum(-1) > 0).sum(-1, keepdim=True).clamp(min=1)


def test_cross_attention_calls_use_their_own_key_positions():
    q, k, v = _qkv(n_query=17, n_key=6)  # image queries, text keys (Wan's cross-attention)
    _, lse, _ = kernels.attention(q, k, v)
    out = probs.attention_slices(
        q, k, text=torch.arange(0), image=torch.arange(17), key_text=torch.arange(6),
        key_image=torch.arange(0), keep=("cross", "key_mass"), lse=lse,
    )  # fmt: skip
    p = _textbook(q, k)
    torch.testing.assert_close(out["cross"].double(), p, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["key_mass"].double(), p.mean(2), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="as many queries as keys"):
        probs.attention_slices(q, k, text=TEXT, image=IMAGE, keep=("cross",))


def test_partial_calls_are_placed_into_the_joint_sequence_with_nan_elsewhere():
    q, k, v = _qkv(n_query=17, n_key=17)  # SD3.5's image-only attn2: image queries and keys
    seq = 23
    full = torch.full((2, 3, seq, seq), math.nan)
    out = probs.placed_slices(
        q, k, (IMAGE, IMAGE), text=TEXT, image=IMAGE, seq_len=seq, keep=("cross", "key_mass", "full"),
        n_heads=3, full=probs.TensorSink(full), lse=kernels.attention(q, k, v)[1],
    )  # fmt: skip
    p = _textbook(q, k)
    assert out["cross"].isnan().all()  # no text keys in this call
    torch.testing.assert_close(out["key_mass"][..., IMAGE].double(), p.mean(2), atol=ATOL, rtol=0)
    assert out["key_mass"][..., TEXT].isnan().all()
    torch.testing.assert_close(full[:, :, IMAGE][..., IMAGE].double(), p, atol=ATOL, rtol=0)
    assert full[:, :, TEXT].isnan().all() and full[..., TEXT].isnan().all()


def test_a_redirect_edits_each_head_before_the_reduction():
    q, k, v = _qkv()
    drop = torch.zeros(2, 23, dtype=torch.bool)
    drop[:, 2] = True
    onto = torch.zeros(2, 23)
    onto[:, [4, 5]] = 0.5
    _, lse, _ = kernels.attention(q, k, v)
    redirect = probs.Redirect(keep=(~drop).float(), share=onto)
    p = _textbook(q, k)
    moved = p[..., 2:3].clone()
    p[..., 2] = 0
    p[..., [4, 5]] += moved / 2
    for reduction in (None, "max"):
        _check(_slices(q, k, lse=lse, redirect=redirect, reduction=reduction), p, reduction)
