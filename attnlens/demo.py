"""attnlens' main job on the embedded model, end to end: what ``make demo`` runs.

1. load the embedded ``shapes-flux`` model (:func:`attnlens.zoo.load`), offline;
2. let it draw a handful of ShapesRef test captions while :func:`attnlens.capture` streams
   ``cross`` and ``key_mass`` of every step into a zarr store;
3. open the store lazily and report which tokens take the most attention per layer, and
   whether any becomes a global attention sink (:func:`attnlens.analysis.find_sinks`);
4. segment every referring expression of those scenes by attention (:func:`attnlens.refam.segment`)
   and score it, beside the attention-only map and the baselines that need no model;
5. write a self-contained HTML report (:class:`attnlens.viz.report.Report`) next to the store.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from tqdm.auto import tqdm

from . import zoo
from .analysis import find_sinks, mass_by_kind, plot_sinks, ratio_by_token, sinks_by_layer
from .capture import capture
from .datasets import shapesref
from .refam import segment
from .refam.benchmark import VARIANTS, evaluate, summarise
from .store import open_store
from .viz.report import Report
from .zoo.card import model_options

__all__ = ["DemoResult", "run", "token_mass"]

#: the variants the demo compares (the benchmark script runs every ablation)
DEMO_VARIANTS = {name: VARIANTS[name] for name in ("RefAM", "attention only, head noun")}


@dataclass
class DemoResult:
    """Where the demo wrote, and the tables it printed.

    Attributes:
        store: the zarr store of the captured sampling runs.
        report: the HTML report.
        token_mass: per layer, the share of attention each token kind takes and the text token
            taking the most (see :func:`token_mass`).
        sinks: :func:`~attnlens.analysis.sinks_by_layer` of the store.
        segmentation: :func:`~attnlens.refam.benchmark.summarise` over every expression.
    """

    store: Path
    report: Path
    token_mass: pd.DataFrame
    sinks: pd.DataFrame
    segmentation: pd.DataFrame


def run(
    out: str | Path = "attnlens-demo",
    *,
    model: str | zoo.ShapesPipeline = "shapes-flux",
    scenes: int = 6,
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
    gallery: int = 12,
    progress: bool = True,
) -> DemoResult:
    """Run the demo into the folder ``out`` (its ``store.zarr`` is replaced).

    Args:
        out: folder for ``store.zarr`` and ``report.html``.
        model: an embedded model's name or a loaded :class:`~attnlens.zoo.ShapesPipeline`.
        scenes: how many ShapesRef test scenes to draw and segment.
        steps: sampling steps per drawing.
        guidance: classifier-free guidance scale of the drawings (1: none), as the model card's
            generation figures are measured; only the conditional branch's attention is analysed.
        seed: seed of the sampling noise.
        gallery: how many expressions the report shows with their heatmap and mask.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = zoo.load(model) if isinstance(model, str) else model
    name = model if isinstance(model, str) else "a ShapesPipeline"
    chosen = list(shapesref.split("test", n=scenes, world=pipe.world))
    options = model_options(pipe)
    store = out / "store.zarr"
    if store.exists():
        shutil.rmtree(store)

    drawings = []
    generator = torch.Generator().manual_seed(seed)
    with capture(pipe, keep=("cross", "key_mass"), heads="mean", store=store) as cap:
        for i, scene in enumerate(tqdm(chosen, desc="drawing", disable=not progress)):
            with cap.sample(f"test-{i}"):
                drawing = pipe(
                    scene.caption, num_inference_steps=steps, guidance_scale=guidance, generator=generator
                )
                drawings.append(drawing[0])

    ds = open_store(store)
    ds = ds.isel(step=ds.branch.values == "cond")  # the unconditional branch reads the empty prompt
    mass = token_mass(ds)
    sinks = find_sinks(ds)
    sink_table = sinks_by_layer(sinks, ds)

    pairs = [(scene, e) for scene in chosen for e in scene.expressions]
    rows = evaluate(pipe, pairs, DEMO_VARIANTS, progress=progress, **options)
    table = summarise(rows, subsets=False)

    report = Report(f"attnlens demo: {name}")
    if isinstance(model, str):
        report.heading(f"What {name} is measured to do (its model card's bars)")
        report.table(zoo.bars(name), notes=BAR_NOTES)
    report.text(
        f"{len(chosen)} ShapesRef test captions drawn in {steps} steps with classifier-free guidance "
        f"{guidance:g} (as the card measures generation), cross and key_mass captured "
        f"into {store.name}; {len(pairs)} referring expressions segmented by attention. Averages over "
        "samples group tokens by what they are (their string), never by their position, since the "
        "captions differ."
    )
    report.heading("What the model drew")
    report.images([(d, s.caption) for d, s in zip(drawings, chosen, strict=True)])
    report.heading("Which tokens take the attention, per layer")
    report.table(mass, notes=TOKEN_MASS_NOTES)
    report.heading("Attention sinks")
    report.table(sink_table, notes=SINK_NOTES)
    report.figure(plot_sinks(sinks, ds))
    report.heading("Referring segmentation by attention")
    report.table(table, notes=SEGMENTATION_NOTES)
    report.text(
        f"RefAM with the options chosen for this model on val ({_describe(options)}): appended magnets, "
        f"GAS handling {options.get('gas', 'suppress')!r}, the spatial prior and {_refiner(options)}; "
        "attention only: the head noun's raw head-mean map, Otsu-thresholded. "
        "The baselines need no model; colour lookup reads the named colour off the clean image; "
        "random object is one object picked blindly: what a perfect segmenter scores when it is not "
        "told which object is meant.",
        note=True,
    )
    _gallery(report, pipe, pairs, gallery, options)
    path = report.save(out / "report.html")
    return DemoResult(store=store, report=path, token_mass=mass, sinks=sink_table, segmentation=table)


def token_mass(ds: xr.Dataset) -> pd.DataFrame:
    """Per layer: the share of incoming attention of each token kind, and the text token taking most.

    ``top text token`` is the text token with the largest sink ratio ``r = N·α`` (``key_mass``
    times the sequence length), tokens grouped by their string across samples
    (:func:`~attnlens.analysis.ratio_by_token`) and averaged over their occurrences, steps and
    heads; ``its r`` is that ratio (1 = what uniform attention gives).
    """
    reduce = [d for d in ("sample", "step") if d in ds.dims]
    share = mass_by_kind(ds).mean(reduce).compute()  # (layer, kind)
    ratio = ratio_by_token(find_sinks(ds), ds).compute()  # (layer, group)
    text = ratio.isel(group=np.flatnonzero(ratio.group_kind.values != "image"))
    rows = []
    for layer in ds.layer.values:
        row = {"layer": str(layer)}
        row.update(
            {str(k): float(v) for k, v in zip(share.kind.values, share.sel(layer=layer).values, strict=True)}
        )
        r = text.sel(layer=layer)
        top = int(np.nanargmax(r.values))
        row["top text token"] = str(r.group.values[top])
        row["its r"] = float(r.values[top])
        rows.append(row)
    return pd.DataFrame(rows)


#: what the columns of the demo's tables mean (shown under each table in the report)
TOKEN_MASS_NOTES = {
    "content": "share of all attention received by content words (mean over samples, steps and heads)",
    "image": "share received by the image tokens; the kinds of a layer sum to 1",
    "pad": "share received by padding tokens",
    "special": "share received by special tokens ([EOS], [CLS], ...)",
    "stop": "share received by stop words (a, the, on, and, ...)",
    "magnet": "share received by appended magnet tokens",
    "top text token": "the text token with the largest mean sink ratio; tokens grouped by their string "
    "across the captions",
    "its r": "its sink ratio r = N·α: the attention it receives over what uniform attention would give (1)",
}
BAR_NOTES = {
    "level": "must: what the model has to meet; aim: what it strives for; finding: reported either way",
    "bar": "what is measured, on ShapesRef's test split unless it says otherwise",
    "measured": "the figure measured for the card",
    "required": "what meets the bar",
    "met": "whether the measured figure meets it",
}
SINK_NOTES = {
    "layer": "transformer layer",
    "layer_kind": "double-stream or single-stream block",
    "gas": "tokens that are global attention sinks (r ≥ 10, most queries alike, in ≥ half of the heads), "
    "each with the share of (caption, step) pairs in which it is one",
    "gas_share": "share of all attention the layer's sinks take (mean over captions and steps)",
    "gas_count": "sinks per (caption, step)",
    "gu_sink_heads": "share of heads with a key taking more than 0.3 of the attention (Gu et al. 2024)",
    "top_kind": "the token kind receiving the most attention",
    "top_kind_share": "its share of all attention",
}
SEGMENTATION_NOTES = {
    "variant": "RefAM and its attention-only ablation, then baselines that need no model",
    "subset": "all expressions",
    "n": "expressions scored",
    "mIoU": "mean over expressions of the mask's intersection over union with the true mask",
    "oIoU": "overall IoU: summed intersections over summed unions",
    "pointing": "share of expressions whose heatmap peak falls inside the true mask (— where no heatmap)",
}


def _describe(options: dict) -> str:
    return ", ".join(f"{k} = {v}" for k, v in options.items())


def _refiner(options: dict) -> str:
    if options.get("refiner", "threshold") == "threshold":
        return "the threshold refiner"
    where = (
        "the grid cell whose segment holds the most heat" if options.get("prompts") == "grid" else "the peak"
    )
    return f"the region segmenter (SAM's model-free stand-in on flat colours) prompted at {where}"


def _gallery(report: Report, pipe: zoo.ShapesPipeline, pairs: list, count: int, options: dict) -> None:
    # round robin over the scenes, so that a short gallery still shows every scene
    order = sorted(range(len(pairs)), key=lambda i: ([p[0] for p in pairs[:i]].count(pairs[i][0]), i))
    shown = [pairs[i] for i in order[:count]]
    report.heading(f"Expressions: {len(shown)} of {len(pairs)}, one per scene in turn")
    rows = []
    for scene, e in shown:
        result = segment(scene.image, e.text, model=pipe, **options)
        images = [scene.image, result.heatmap, result.mask.astype(np.float32), scene.masks[e.target]]
        rows.append((e.text, [np.asarray(a, dtype=np.float32) if a.dtype == bool else a for a in images]))
    report.gallery(["image", "RefAM heatmap", "RefAM mask", "true mask"], rows)
