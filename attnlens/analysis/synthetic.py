"""Synthetic attention captures with planted structure: known answers for the analyses.

A synthetic capture is built from dense probabilities ``P`` of shape
``(sample, step, layer, head, seq, seq)`` over a FLUX-like ``[text | image]`` sequence and
returned as a Dataset of the capture schema (:mod:`attnlens.schema`), so that every analysis
sees exactly what a real capture or store would give it. Structure is planted by editing ``P``
row by row, which keeps every row a probability distribution.

>>> from attnlens.analysis import synthetic
>>> ds = synthetic.planted(layers=4, heads=2, steps=1, grid=(2, 2), sink=0, sink_layers=[2, 3])
>>> ds.key_mass.dims
('sample', 'step', 'layer', 'head', 'key')
>>> tuple(round(float(v), 2) for v in ds.key_mass.isel(key=0).mean(("sample", "step", "head")))
(0.06, 0.06, 0.6, 0.6)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import xarray as xr

from ..schema import CapturedStep, SampleGroup, assemble
from ..text import TokenLabels, is_stop_word

__all__ = ["from_probabilities", "plant_sink", "planted", "prompt_labels", "random_attention", "scale_keys"]

Index = int | Sequence[int] | range | None


def prompt_labels(prompt: str, text_len: int, *, magnets: Sequence[str] = ()) -> TokenLabels:
    """Word-level labels: one token per word of ``prompt``, appended ``magnets``, ``</s>``, then ``<pad>``.

    >>> prompt_labels("the red mug", 6, magnets=["a"]).token_kind.tolist()
    ['stop', 'content', 'content', 'magnet', 'special', 'pad']
    """
    words = prompt.split()
    n_words = len(words) + len(magnets)
    if n_words + 1 > text_len:
        raise ValueError(f"{n_words} words and </s> do not fit in {text_len} text tokens")
    pads = text_len - n_words - 1
    kinds = ["stop" if is_stop_word(w) else "content" for w in words] + ["magnet"] * len(magnets)
    return TokenLabels(
        token_str=np.array([*words, *magnets, "</s>", *["<pad>"] * pads], dtype=object),
        word=np.array([*words, *magnets, "", *[""] * pads], dtype=object),
        word_index=np.array([*range(n_words), -1, *[-1] * pads], dtype=np.int64),
        token_kind=np.array([*kinds, "special", *["pad"] * pads], dtype=object),
    )


def random_attention(
    shape: tuple[int, int, int, int], seq: int, *, spread: float = 0.5, seed: int = 0
) -> np.ndarray:
    """Background attention: rows ``softmax(spread · z)`` with ``z ~ N(0, 1)``, float64.

    ``shape`` is ``(sample, step, layer, head)``; the result is ``(*shape, seq, seq)``. With the
    default ``spread`` every key's sink ratio stays within a few tenths of 1.
    """
    z = np.random.default_rng(seed).standard_normal((*shape, seq, seq)) * spread
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def _axis(index: Index, size: int) -> np.ndarray:
    if index is None:
        return np.arange(size)
    return np.atleast_1d(np.asarray(list(index) if isinstance(index, Iterable) else index, dtype=np.int64))


def _rows(
    probs: np.ndarray, samples: Index, steps: Index, layers: Index, heads: Index, queries: Index
) -> tuple:
    return np.ix_(
        *(
            _axis(ix, n)
            for ix, n in zip((samples, steps, layers, heads, queries), probs.shape[:5], strict=True)
        )
    )


def plant_sink(
    probs: np.ndarray,
    key: int,
    *,
    mass: float,
    layers: Index = None,
    heads: Index = None,
    queries: Index = None,
    steps: Index = None,
    samples: Index = None,
) -> None:
    """Make ``key`` take ``mass`` of the chosen rows' attention, in place; other keys keep proportions."""
    idx = _rows(probs, samples, steps, layers, heads, queries)
    rows = probs[idx]
    rest = 1.0 - rows[..., key : key + 1]
    rows *= (1.0 - mass) / rest
    rows[..., key] = mass
    probs[idx] = rows


def scale_keys(
    probs: np.ndarray,
    keys: Sequence[int],
    factor: float,
    *,
    layers: Index = None,
    heads: Index = None,
    queries: Index = None,
    steps: Index = None,
    samples: Index = None,
) -> None:
    """Multiply the chosen rows' attention to ``keys`` by ``factor`` and renormalise the rows, in place."""
    idx = _rows(probs, samples, steps, layers, heads, queries)
    rows = probs[idx]
    rows[..., list(keys)] *= factor
    probs[idx] = rows / rows.sum(axis=-1, keepdims=True)


def from_probabilities(
    probs: np.ndarray,
    labels: TokenLabels | Sequence[TokenLabels],
    *,
    grid: tuple[int, int],
    keep: Sequence[str] = ("key_mass", "cross", "text_to_image", "full"),
    hidden_norm: np.ndarray | None = None,
    layers: Sequence[str] | None = None,
    timesteps: Sequence[float] | None = None,
    dtype: type = np.float32,
) -> xr.Dataset:
    """A capture-schema Dataset of dense probabilities over a ``[text | image]`` sequence.

    Args:
        probs: ``(sample, step, layer, head, seq, seq)``, rows summing to 1, with
            ``seq = len(labels) + grid[0] · grid[1]``: text first, then the image tokens row-major.
        labels: token labels of the text positions, one per sample or one for all.
        grid: ``(height, width)`` of the image token grid.
        keep: variables to derive from ``probs`` (``key_mass``, ``cross``, ``text_to_image``, ``full``).
        hidden_norm: optional ``(sample, step, layer, seq)`` hidden-state norms.
        layers: layer names (default ``block.0``, ``block.1``, …).
        timesteps: one per step (default evenly from 1000 down).
        dtype: dtype of the stored variables.
    """
    probs = np.asarray(probs)
    n_samples, n_steps, n_layers, n_heads, seq = probs.shape[:5]
    labels = [labels] * n_samples if isinstance(labels, TokenLabels) else list(labels)
    n_text = len(labels[0])
    height, width = grid
    if seq != n_text + height * width or probs.shape[5] != seq:
        raise ValueError(
            f"probs over {seq} tokens do not fit {n_text} text tokens and a {height}×{width} grid"
        )
    names = list(layers) if layers is not None else [f"block.{i}" for i in range(n_layers)]
    ts = list(timesteps) if timesteps is not None else list(np.linspace(1000.0, 1000.0 / n_steps, n_steps))
    text, image = np.arange(n_text), np.arange(n_text, seq)
    derive = {
        "key_mass": lambda p: p.mean(axis=-2),
        "cross": lambda p: p[..., image, :][..., text],
        "text_to_image": lambda p: p[..., text, :][..., image],
        "full": lambda p: p,
    }
    steps = []
    for s in range(n_steps):
        arrays = {
            var: {name: derive[var](probs[:, s, i]).astype(dtype) for i, name in enumerate(names)}
            for var in keep
        }
        if hidden_norm is not None:
            arrays["hidden_norm"] = {name: hidden_norm[:, s, i].astype(dtype) for i, name in enumerate(names)}
        steps.append(CapturedStep(s, float(ts[s]), "cond", arrays))
    yx = np.stack(np.divmod(np.arange(height * width), width), axis=1)
    return assemble(
        [
            SampleGroup(
                steps=steps, labels=labels, prompts=[" ".join(w for w in lab.word if w) for lab in labels]
            )
        ],
        layers=names,
        layer_kinds=["block"] * n_layers,
        heads=list(range(n_heads)),
        grid=np.concatenate([np.zeros((height * width, 1), dtype=np.int64), yx], axis=1),
        n_text=n_text,
        seq_len=seq,
        text_positions=text,
        attrs={"model_class": "synthetic", "family": "synthetic"},
    )


def planted(
    *,
    layers: int = 24,
    heads: int = 4,
    steps: int = 2,
    samples: int = 1,
    grid: tuple[int, int] = (8, 8),
    prompt: str = "a red mug on the table",
    text_len: int = 12,
    sink: int | None = None,
    sink_layers: Index = None,
    sink_mass: float = 0.6,
    sink_norm: float = 500.0,
    magnets: Sequence[str] = (),
    magnet_layers: Index = None,
    magnet_factor: float = 4.0,
    keep: Sequence[str] = ("key_mass", "cross", "text_to_image", "full", "hidden_norm"),
    seed: int = 0,
) -> xr.Dataset:
    """A synthetic capture with a planted attention sink and planted magnet tokens.

    - background: :func:`random_attention`; hidden-state norms ``10 ± 0.5``;
    - ``sink`` (a position of the joint sequence): takes ``sink_mass`` of every query's attention
      in every head of ``sink_layers`` (default: layers 10–18 of 24, the same share of other
      depths), and its hidden norm there is ``sink_norm``;
    - ``magnets`` (token strings, e.g. ``"the"`` or ``"<pad>"``): image queries attend to them
      ``magnet_factor`` times more in ``magnet_layers`` (default all).
    """
    labels = prompt_labels(prompt, text_len)
    seq = text_len + grid[0] * grid[1]
    probs = random_attention((samples, steps, layers, heads), seq, seed=seed)
    if magnets:
        keys = [i for i, t in enumerate(labels.token_str) if t in set(magnets)]
        scale_keys(probs, keys, magnet_factor, layers=magnet_layers, queries=range(text_len, seq))
    norms = None
    if "hidden_norm" in keep:
        norms = 10.0 + 0.5 * np.random.default_rng(seed + 1).standard_normal((samples, steps, layers, seq))
    if sink is not None:
        if sink_layers is None:
            sink_layers = range(layers * 5 // 12, layers * 19 // 24)
        plant_sink(probs, sink, mass=sink_mass, layers=sink_layers)
        if norms is not None:
            norms[:, :, _axis(sink_layers, layers), sink] = sink_norm
    return from_probabilities(
        probs, labels, grid=grid, keep=[k for k in keep if k != "hidden_norm"], hidden_norm=norms
    )
