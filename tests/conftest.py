"""Shared fixtures: tiny random-config FLUX models (diffusers' test configs) and an eager oracle."""

from __future__ import annotations

import math

import pytest
import torch

from attnlens.testing import tiny_flux_pipeline, tiny_flux_transformer


@pytest.fixture
def flux():
    """A FluxTransformer2DModel with 2 double and 2 single blocks, 2 heads × 16."""
    return tiny_flux_transformer(num_layers=2, num_single_layers=2)


@pytest.fixture
def flux_pipe():
    """A FluxPipeline of tiny random parts, T5 padded to 16 tokens."""
    return tiny_flux_pipeline(num_layers=1, num_single_layers=1)


class EagerAttention:
    """Records textbook ``softmax(QKᵀ/√d)`` for every call of FLUX's attention function.

    An oracle independent of attnlens' chunked math: installed *under* attnlens' own wrapper,
    it sees the same post-RoPE q and k and keeps the dense ``(batch, head, query, key)``
    probabilities of each call in order.
    """

    def __init__(self, monkeypatch):
        import diffusers.models.transformers.transformer_flux as module

        self.probs: list[torch.Tensor] = []
        original = module.dispatch_attention_fn

        def eager(query, key, value, attn_mask=None, *args, **kwargs):
            q, k = query.transpose(1, 2).double(), key.transpose(1, 2).double()
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            self.probs.append(torch.softmax(logits, dim=-1).float().detach())
            return original(query, key, value, attn_mask, *args, **kwargs)

        monkeypatch.setattr(module, "dispatch_attention_fn", eager)


@pytest.fixture
def eager(monkeypatch):
    return EagerAttention(monkeypatch)


NORMALISER_PATHS = {  # what the Dataset's capture_paths attribute says for each
    "kernel lse, pass over rows": {"lse": ["kernel:flash_attention_for_cpu"], "key_mass": ["pass over rows"]},
    "kernel lse, reverse call": {
        "lse": ["kernel:flash_attention_for_cpu"],
        "key_mass": ["reverse call:flash_attention_for_cpu"],
    },
    "recompute": {"lse": ["recompute"], "key_mass": ["recompute"]},
}


@pytest.fixture(params=sorted(NORMALISER_PATHS))
def normaliser_path(request, monkeypatch):
    """Runs a test on each path the row normaliser and the incoming mass can take; gives capture_paths."""
    from attnlens import kernels, probs

    monkeypatch.setattr(kernels, "_VERDICTS", {})
    if request.param == "recompute":  # as where no kernel returns its log-sum-exp (another attention backend)
        monkeypatch.setattr(kernels, "_KERNELS", {})
    if "pass" in request.param:
        monkeypatch.setattr(probs, "REVERSE_CALL", False)
    return NORMALISER_PATHS[request.param]
