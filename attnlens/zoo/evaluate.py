"""Measure a ShapesRef model: do its word maps find the referred object, and can it draw?

Grounding: each referring expression of a split is the prompt; its scene, noised to flow time
``t``, goes through one forward with ``cross`` captured. A word's map is its image→text
attention averaged over heads (and layers, unless per layer), upsampled from the token grid
to pixels and thresholded with Otsu's method. Maps are scored against the target's exact mask
by IoU (mean over expressions: mIoU; pooled: oIoU) and the pointing game, beside baselines
that need no attention: the whole image, a centre box, the union of all objects, the token-grid
ceiling (the best mask the token grid can draw) and a colour lookup on the clean image.

Generation: single-object prompts ("a red circle on a grey background") are sampled and a small
classifier trained on real scenes reads back colour and shape.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ..analysis.metrics import otsu_threshold, pointing_game
from ..capture import capture
from ..datasets import shapesref
from .shapes import ShapesPipeline

__all__ = ["GroundingRun", "grounding", "otsu", "summarise"]

WORD_SETS = ("phrase", "noun", "colour")


@dataclass
class GroundingRun:
    """Per-expression maps and masks of one model at one noise level.

    Attributes:
        maps: ``(word_set, sample, layer, y, x)`` pixel maps; ``word_set`` is ``phrase``
            (colour + noun tokens), ``noun`` or ``colour`` (NaN where the expression has none).
        target: ``(sample, y, x)`` bool target masks.
        pairs: the ``(scene, expression)`` pairs, in ``sample`` order.
        table: one row per expression: text, kind, has_same_colour_distractor, colour, noun.
    """

    maps: xr.DataArray
    target: xr.DataArray
    pairs: list[tuple[shapesref.Scene, shapesref.Expression]]
    table: pd.DataFrame


def grounding(
    pipe: ShapesPipeline,
    pairs: Iterable[tuple[shapesref.Scene, shapesref.Expression]],
    *,
    t: float = 0.5,
    seed: int = 0,
    batch: int = 50,
) -> GroundingRun:
    """Capture every expression's word maps on its noised scene (see the module docstring)."""
    pairs = list(pairs)
    g = torch.Generator().manual_seed(seed)
    datasets = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            images = np.stack([scene.image for scene, _ in chunk])
            with capture(pipe, keep="cross", heads="mean") as cap:
                x_t = pipe.noised_tokens(images, t, generator=g)
                text = pipe.encode_prompt([e.text for _, e in chunk])
                pipe.velocity(x_t, torch.full((len(chunk),), t, device=pipe.device), text)
            datasets.append(cap.result.isel(step=0, head=0, drop=True))
    ds = xr.concat(datasets, dim="sample", coords="different", compat="equals", join="override")
    colours = set(shapesref.COLOURS)
    rows, weights = [], np.zeros((len(WORD_SETS), len(pairs), ds.sizes["key_text"]), dtype=np.float32)
    for i, (_, e) in enumerate(pairs):
        words = ds.word.values[i]
        colour = next((w for w in e.text.split() if w in colours), None)
        noun = words == e.head_noun
        col = words == colour if colour else np.zeros_like(noun)
        for k, sel in enumerate((noun | col, noun, col)):
            weights[k, i] = sel / sel.sum() if sel.any() else np.nan
        rows.append(
            dict(
                text=e.text,
                kind=e.kind,
                has_same_colour_distractor=e.has_same_colour_distractor,
                colour=colour,
                noun=e.head_noun,
            )
        )
    w = xr.DataArray(weights, dims=("word_set", "sample", "key_text"), coords={"word_set": list(WORD_SETS)})
    token_maps = xr.dot(
        ds.cross.reset_coords(drop=True), w, dim="key_text"
    )  # (word_set, sample, layer, query)
    grid = pipe.config.grid
    token_maps = token_maps.transpose("word_set", "sample", "layer", "query").values
    token_maps = token_maps.reshape(*token_maps.shape[:3], grid, grid)
    p = pipe.config.patch
    pixel = np.repeat(np.repeat(token_maps, p, axis=-2), p, axis=-1)
    maps = xr.DataArray(
        pixel,
        dims=("word_set", "sample", "layer", "y", "x"),
        coords={"word_set": list(WORD_SETS), "layer": ds.layer.values},
    )
    target = np.stack([scene.masks[e.target] for scene, e in pairs])
    return GroundingRun(
        maps=maps,
        target=xr.DataArray(target, dims=("sample", "y", "x")),
        pairs=pairs,
        table=pd.DataFrame(rows),
    )


def otsu(maps: np.ndarray) -> np.ndarray:
    """Otsu's threshold of each map over its last two axes: bool masks of the same shape.

    A constant (or non-finite) map has no threshold and is all False.

    >>> m = np.zeros((1, 4, 4)); m[0, :2] = 1.0
    >>> int(otsu(m)[0].sum())
    8
    """
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1])
    out = np.zeros(flat.shape, dtype=bool)
    for i, v in enumerate(flat):
        if np.isfinite(v).all() and v.max() > v.min():
            out[i] = v >= otsu_threshold(v)
    return out.reshape(maps.shape)


def summarise(run: GroundingRun, patch: int, model: str, subsets: bool = True) -> pd.DataFrame:
    """mIoU, oIoU and pointing of the model's maps (per layer and all layers) and of the baselines."""
    target = run.target.values
    groups = {"all": np.ones(len(target), dtype=bool)}
    if subsets:
        groups["same-colour distractor"] = run.table.has_same_colour_distractor.values
        groups["colour unique"] = (
            ~run.table.has_same_colour_distractor.values & run.table.colour.notna().values
        )
        for kind in ("colour_shape", "shape", "size", "position"):
            groups[kind] = (run.table.kind == kind).values
    rows = []

    def score(name: str, masks: np.ndarray, heat: np.ndarray | None, words: str) -> None:
        valid = np.isfinite(heat).all((-2, -1)) if heat is not None else np.ones(len(masks), dtype=bool)
        inter = (masks & target).sum((1, 2))
        union = (masks | target).sum((1, 2))
        ious = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        if heat is not None:
            hm = xr.DataArray(np.nan_to_num(heat, nan=0.0), dims=("sample", "y", "x"))
            point = pointing_game(hm, run.target, dims=("y", "x")).values
        for group, sel in groups.items():
            sel = sel & valid
            if not sel.any():
                continue
            rows.append(
                dict(
                    model=name,
                    words=words,
                    subset=group,
                    n=int(sel.sum()),
                    mIoU=float(ious[sel].mean()),
                    oIoU=float(inter[sel].sum() / max(union[sel].sum(), 1)),
                    pointing=float(point[sel].mean()) if heat is not None else np.nan,
                )
            )

    for words in WORD_SETS:
        per_layer = run.maps.sel(word_set=words)
        mean = per_layer.mean("layer").values
        score(model, otsu(mean), mean, words)
        for layer in per_layer.layer.values:
            heat = per_layer.sel(layer=layer).values
            score(f"{model} [{layer}]", otsu(heat), heat, words)
    for name, masks in shapesref.baselines(run.pairs, patch).items():
        score(name, masks, None, "-")
    return pd.DataFrame(rows)


class Readout(torch.nn.Module):
    """A small CNN that reads the colour and shape of the one object in a ShapesRef image.

    Input ``(batch, 3, H, W)`` in ``[-1, 1]``; output logits ``(batch, colours + shapes)`` over the
    world's colours and shapes.
    """

    def __init__(self, world: shapesref.World | str = "v1") -> None:
        super().__init__()
        self.world = shapesref.world_of(world)
        c = torch.nn
        self.features = c.Sequential(
            c.Conv2d(3, 16, 5, stride=2, padding=2), c.ReLU(),
            c.Conv2d(16, 32, 3, stride=2, padding=1), c.ReLU(),
            c.Conv2d(32, 64, 3, stride=2, padding=1), c.ReLU(),
            c.Conv2d(64, 64, 3, padding=1), c.ReLU(),
            c.AdaptiveMaxPool2d(1), c.Flatten(),
        )  # fmt: skip
        self.head = c.Linear(64, len(self.world.colours) + len(self.world.shapes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def read(self, images: np.ndarray) -> tuple[list[str], list[str]]:
        """Colour and shape names of ``(batch, H, W, 3)`` uint8 images."""
        with torch.no_grad():
            logits = self(_to_tensor(images))
        colours, shapes = self.world.colours, self.world.shapes
        nc = len(colours)
        return (
            [colours[i] for i in logits[:, :nc].argmax(1).tolist()],
            [shapes[i] for i in logits[:, nc:].argmax(1).tolist()],
        )


def single_object_scenes(n: int, seed: int, world: shapesref.World | str = "v1") -> list[shapesref.Scene]:
    """``n`` seeded one-object scenes of ``world`` (their captions are the generation prompts)."""
    rng = np.random.default_rng(seed)
    return [shapesref.make_scene(rng, n_objects=1, world=world) for _ in range(n)]


def train_readout(
    n: int = 6000, epochs: int = 20, seed: int = 0, world: shapesref.World | str = "v1"
) -> tuple[Readout, float]:
    """Train :class:`Readout` on real one-object scenes of ``world``; returns it and its held-out
    accuracy (colour and shape both right). Cached per process: a readout is trained once per
    world, whether the world is given by name or as a :class:`~attnlens.datasets.shapesref.World`.

    Generation bars are only as good as this oracle: after 6 epochs it read 0.74 of v2's real
    scenes right (shapes drawn were under-counted by as much), after 20 all of them."""
    return _train_readout(n, epochs, seed, shapesref.world_of(world))


@functools.cache
def _train_readout(n: int, epochs: int, seed: int, world: shapesref.World) -> tuple[Readout, float]:
    torch.manual_seed(seed)
    scenes = single_object_scenes(n + 500, seed=1000 + seed, world=world)
    x = _to_tensor(np.stack([s.image for s in scenes]))
    model = Readout(world)
    colours, shapes = model.world.colours, model.world.shapes
    yc = torch.tensor([colours.index(s.objects[0].colour) for s in scenes])
    ys = torch.tensor([shapes.index(s.objects[0].shape) for s in scenes])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    nc = len(colours)
    for _ in range(epochs):
        order = torch.randperm(n)
        for i in range(0, n, 128):
            idx = order[i : i + 128]
            logits = model(x[idx])
            loss = torch.nn.functional.cross_entropy(logits[:, :nc], yc[idx])
            loss = loss + torch.nn.functional.cross_entropy(logits[:, nc:], ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x[n:])
    right = (logits[:, :nc].argmax(1) == yc[n:]) & (logits[:, nc:].argmax(1) == ys[n:])
    return model, float(right.float().mean())


def generation(
    pipe: ShapesPipeline,
    readout: Readout,
    n: int = 120,
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
) -> pd.DataFrame:
    """Sample one-object captions of the readout's world and read colour and shape back: one row
    per prompt."""
    scenes = single_object_scenes(n, seed=5000 + seed, world=readout.world)
    g = torch.Generator().manual_seed(seed)
    images = np.concatenate(
        [
            pipe([s.caption for s in scenes[i : i + 40]], steps, guidance_scale=guidance, generator=g)
            for i in range(0, n, 40)
        ]
    )
    colours, shapes = readout.read(images)
    return pd.DataFrame(
        dict(
            prompt=[s.caption for s in scenes],
            want_colour=[s.objects[0].colour for s in scenes],
            want_shape=[s.objects[0].shape for s in scenes],
            got_colour=colours,
            got_shape=shapes,
        )
    ).assign(
        colour_ok=lambda d: d.want_colour == d.got_colour,
        shape_ok=lambda d: d.want_shape == d.got_shape,
    )


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(images), dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1
