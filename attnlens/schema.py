"""The names of an attention capture: variables, dimensions, coordinates and attributes.

One schema serves the in-memory result of a capture and every store, so that what a
capture returns and what a store reads back are the same ``xarray.Dataset``.

=================  ================================================  ==============================
variable           dims                                              meaning
=================  ================================================  ==============================
``cross``          sample, step, layer, head, query, key_text        image → text probabilities
``text_to_image``  sample, step, layer, head, query_text, key_image  text → image probabilities
``key_mass``       sample, step, layer, head, key                    mean attention each key gets
``full``           sample, step, layer, head, query_all, key         dense probabilities (opt-in)
``hidden_norm``    sample, step, layer, key                          L2 norm of each token's state
=================  ================================================  ==============================

``query``/``key_image`` index the image (video) tokens, ``key_text``/``query_text`` the text
tokens and ``key``/``query_all`` the whole joint sequence, each in sequence order; distinct
names are needed because one dimension name has one size in a Dataset.

Coordinates: ``step`` (+ ``timestep``, ``branch``, ``denoise_step``, ``transformer``); ``layer`` (+
``layer_kind``); ``head`` (indices, or the reduction's name); ``query`` (+ ``frame``, ``y``,
``x``); ``key_text`` (+ ``token_str``, ``word``, ``word_index``, ``token_kind``, each over
``(sample, key_text)`` since prompts differ between samples); ``key`` (+ ``key_kind`` over
``(sample, key)``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from .text import TokenLabels

__all__ = ["DIMS", "SCHEMA_VERSION", "CapturedStep", "assemble", "config_hash"]

SCHEMA_VERSION = 1

DIMS: dict[str, tuple[str, ...]] = {
    "cross": ("sample", "step", "layer", "head", "query", "key_text"),
    "text_to_image": ("sample", "step", "layer", "head", "query_text", "key_image"),
    "key_mass": ("sample", "step", "layer", "head", "key"),
    "full": ("sample", "step", "layer", "head", "query_all", "key"),
    "hidden_norm": ("sample", "step", "layer", "key"),
}


@dataclass
class CapturedStep:
    """What one transformer forward kept: ``arrays[variable][layer]`` is ``(batch, ...)``.

    The arrays are numpy arrays or host tensors, already in the dtype they are kept in.
    """

    denoise_step: int
    timestep: float
    branch: str
    arrays: dict[str, dict[str, Any]]
    #: which of a pipeline's transformers ran the forward (Wan 2.2: ``transformer_2`` at low noise)
    transformer: str = "transformer"


@dataclass
class SampleGroup:
    """Consecutive samples that went through the same forwards (one batch of one run)."""

    steps: list[CapturedStep]
    labels: list[TokenLabels]  # one per sample
    prompts: list[str]


def config_hash(config: Any) -> str:
    """A short, stable hash of a model config (any JSON-able mapping).

    >>> config_hash({"num_layers": 2}) == config_hash({"num_layers": 2})
    True
    """
    # private keys are bookkeeping, not architecture: diffusers' `_use_default_values` is built
    # from a set, so its order (and the hash) would change with each process's string hashing
    public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    blob = json.dumps(public, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def assemble(
    groups: Sequence[SampleGroup],
    *,
    layers: Sequence[str],
    layer_kinds: Sequence[str],
    heads: Sequence[int | str],
    grid: np.ndarray,
    n_text: int,
    seq_len: int,
    text_positions: np.ndarray,
    attrs: dict[str, Any],
) -> xr.Dataset:
    """Stack captured sample groups into one Dataset of the schema above.

    Every group must have gone through the same steps (timestep and branch); the caller
    checks token layouts.
    """
    from .errors import LayoutError

    signature = [(s.denoise_step, s.timestep, s.branch, s.transformer) for s in groups[0].steps]
    for g in groups[1:]:
        other = [(s.denoise_step, s.timestep, s.branch, s.transformer) for s in g.steps]
        if other != signature:
            raise LayoutError(
                f"samples went through different denoising steps ({len(signature)} vs {len(other)} forwards, "
                "or other timesteps/branches) and cannot share one Dataset: capture them separately"
            )
    names = sorted({v for g in groups for s in g.steps for v in s.arrays})
    data_vars = {}
    for var in names:
        # one copy, into the Dataset's array: (sample, step, layer, ...)
        first = _numpy(groups[0].steps[0].arrays[var][layers[0]])
        n = sum(len(_numpy(g.steps[0].arrays[var][layers[0]])) for g in groups)
        out = np.empty((n, len(signature), len(layers), *first.shape[1:]), dtype=first.dtype)
        start = 0
        for g in groups:
            for i, step in enumerate(g.steps):
                for j, name in enumerate(layers):
                    values = _numpy(step.arrays[var][name])
                    out[start : start + len(values), i, j] = values
            start += len(values)
        data_vars[var] = (DIMS[var], out)
    labels = [lab for g in groups for lab in g.labels]
    n_samples = len(labels)
    image_kind = np.full(seq_len, "image", dtype=object)
    key_kind = np.stack([_put(image_kind, text_positions, lab.token_kind) for lab in labels])
    coords = {
        "sample": np.arange(n_samples),
        "step": np.arange(len(signature)),
        "denoise_step": ("step", np.array([s[0] for s in signature], dtype=np.int64)),
        "timestep": ("step", np.array([s[1] for s in signature], dtype=np.float64)),
        "branch": ("step", np.array([s[2] for s in signature], dtype=object)),
        "transformer": ("step", np.array([s[3] for s in signature], dtype=object)),
        "layer": np.array(layers, dtype=object),
        "layer_kind": ("layer", np.array(layer_kinds, dtype=object)),
        "head": np.array(heads, dtype=object if isinstance(heads[0], str) else np.int64),
        "query": np.arange(len(grid)),
        "frame": ("query", grid[:, 0]),
        "y": ("query", grid[:, 1]),
        "x": ("query", grid[:, 2]),
        "key_text": np.arange(n_text),
        "token_str": (("sample", "key_text"), np.stack([lab.token_str for lab in labels])),
        "word": (("sample", "key_text"), np.stack([lab.word for lab in labels])),
        "word_index": (("sample", "key_text"), np.stack([lab.word_index for lab in labels])),
        "token_kind": (("sample", "key_text"), np.stack([lab.token_kind for lab in labels])),
        "key": np.arange(seq_len),
        "key_kind": (("sample", "key"), key_kind),
    }
    if "text_to_image" in data_vars:
        coords.update(query_text=np.arange(n_text), key_image=np.arange(len(grid)))
    if "full" in data_vars:
        coords["query_all"] = np.arange(seq_len)
    prompts = [p for g in groups for p in g.prompts]
    attrs = {**attrs, "schema_version": SCHEMA_VERSION, "prompts": prompts}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _put(base: np.ndarray, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = base.copy()
    out[positions] = values
    return out


def _numpy(values: Any) -> np.ndarray:
    """A kept array as numpy: a view of a host tensor (bfloat16, which numpy lacks, as float32)."""
    if isinstance(values, np.ndarray):
        return values
    import torch

    values = values.detach()
    if values.dtype == torch.bfloat16:
        values = values.float()
    return values.cpu().numpy()
