"""What the video adapters share: token grids, timestep values and batched-CFG rows.

Video DiTs patchify a latent ``(frames, height, width)`` and flatten the patches frame by
frame, row by row; every adapter of :mod:`attnlens.models` that sees video uses
:func:`video_grid` to label those tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import CallLayout

__all__ = ["batched_cfg_rows", "grid_from_coords", "timestep_value", "video_grid", "video_layout"]


def video_grid(frames: int, height: int, width: int) -> np.ndarray:
    """``(frame, y, x)`` of each token of a ``frames × height × width`` token grid in row-major order.

    >>> video_grid(2, 1, 3).tolist()
    [[0, 0, 0], [0, 0, 1], [0, 0, 2], [1, 0, 0], [1, 0, 1], [1, 0, 2]]
    """
    f, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    return np.stack([f.ravel(), y.ravel(), x.ravel()], axis=1).astype(np.int64)


def video_layout(given: dict[str, Any], grid: np.ndarray, **options: Any) -> CallLayout:
    """The joint layout of one video DiT forward: its batch and text length read from the bound
    ``hidden_states`` (batch first) and ``encoder_hidden_states``, the step from ``timestep``,
    and ``grid`` ``(tokens, 3)``; ``options`` as :meth:`CallLayout.concatenated` (order, text mask)."""
    return CallLayout.concatenated(
        given["hidden_states"].shape[0],
        timestep_value(given.get("timestep")),
        given["encoder_hidden_states"].shape[1],
        grid,
        **options,
    )


def grid_from_coords(coords: torch.Tensor) -> np.ndarray:
    """Integer ``(frame, y, x)`` of tokens whose positions are given as real coordinates ``(3, tokens)``.

    Each axis is ranked over its distinct values, so scaled or offset coordinates (LTX's
    ``video_coords`` in pixels) give consecutive indices.

    >>> grid_from_coords(torch.tensor([[0.0, 0.0, 8.0], [0.0, 32.0, 0.0], [16.0, 16.0, 16.0]])).tolist()
    [[0, 0, 0], [0, 1, 0], [1, 0, 0]]
    """
    values = coords.detach().float().cpu().numpy()
    return np.stack([np.unique(axis, return_inverse=True)[1] for axis in values], axis=1).astype(np.int64)


def timestep_value(timestep: Any) -> float:
    """The scheduler's timestep of one forward from the transformer's ``timestep`` argument.

    Per-sample ``(batch,)`` values are equal within a sampler step; per-token ``(batch,
    tokens)`` values (Wan 2.2 TI2V, LTX image-to-video) are 0 on the conditioning frame, so
    the largest value of the first sample is the step's timestep.

    >>> timestep_value(torch.tensor([[0.0, 750.0, 750.0]]))
    750.0
    """
    t = torch.as_tensor(timestep)
    if t.ndim >= 2:
        return float(t[0].max().item())
    return float(t.flatten()[0].item())


class SelfCrossAttention:
    """Mixin for video DiTs with separate self- (``self.N``) and cross-attention (``cross.N``) layers.

    Video tokens query in both; keys are the video tokens in self-attention and the text in
    cross-attention. Blocks update the video tokens only.
    """

    def call_tokens(
        self, layer: Any, layout: Any, n_query: int, n_key: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = layout.text if layer.kind == "cross" else layout.image
        if n_query != len(layout.image) or n_key != len(keys):
            kind = "text" if layer.kind == "cross" else "video"
            raise ValueError(
                f"{layer.name}: a call of {n_query} queries and {n_key} keys does not match "
                f"{len(layout.image)} video and {len(keys)} {kind} tokens"
            )
        return layout.image, keys

    def block_hidden(self, output: Any) -> torch.Tensor:
        return output  # (batch, video, dim): the text is not a block's output


class BatchedCFG:
    """Mixin for adapters of pipelines that run both CFG branches in one forward (see below)."""

    def branches(self, pipeline: Any | None, layout: Any, kwargs: dict[str, Any]) -> tuple[str, ...] | None:
        hidden = kwargs.get("hidden_states")
        return batched_cfg_rows(pipeline, hidden) if isinstance(hidden, torch.Tensor) else None


def batched_cfg_rows(pipeline: Any | None, hidden_states: torch.Tensor) -> tuple[str, ...] | None:
    """Branch of each batch row when a pipeline runs both CFG branches in one forward.

    Mochi, CogVideoX and LTX concatenate ``[uncond rows | cond rows]`` (negative prompt first)
    with the same latents twice. A batch counts as such only while the pipeline guides and its
    two halves hold identical latents, so that a batch of several prompts is never mistaken
    for one.

    Returns:
        ``("uncond", …, "cond", …)`` for a CFG batch, ``("cond", …)`` for an unguided batch
        of a pipeline, ``None`` for a bare transformer (the hooks' branch applies).
    """
    if pipeline is None:
        return None
    batch = hidden_states.shape[0]
    guided = getattr(pipeline, "do_classifier_free_guidance", None)
    if guided is None:  # CogVideoX keeps the scale only
        guided = float(getattr(pipeline, "_guidance_scale", 1.0) or 1.0) > 1.0
    half = batch // 2
    if guided and batch % 2 == 0 and torch.equal(hidden_states[:half], hidden_states[half:]):
        return ("uncond",) * half + ("cond",) * half
    return ("cond",) * batch


def _channels(values: Any, like: torch.Tensor) -> torch.Tensor:
    """Per-channel VAE statistics (``latents_mean``, ``latents_std``) as ``(1, C, 1, 1, 1)`` of ``like``."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)


def text_inputs(pipeline: Any, prompt: str, max_sequence_length: int, *, masked: bool) -> dict[str, Any]:
    """The text inputs of a video pipeline's ``encode_prompt`` without guidance: the embeddings, and
    with ``masked`` the padding mask (Mochi, LTX)."""
    encoded = pipeline.encode_prompt(
        prompt,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
        device=pipeline.transformer.device,
    )
    inputs = {"encoder_hidden_states": encoded[0].to(pipeline.transformer.dtype)}
    if masked:
        inputs["encoder_attention_mask"] = encoded[1]
    return inputs
