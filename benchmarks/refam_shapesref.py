"""RefAM on the ShapesRef test split with the embedded model: full pipeline, each ablation, the
attention-only baseline and the baselines that need no model (mIoU, oIoU, pointing), and, on
the video split, J&F of every frame's mask.

Every variant segments the same expressions with the same noise (:mod:`attnlens.refam.benchmark`
lists them). Results print as Markdown and replace this benchmark's section of BENCHMARKS.md
unless ``--no-write``.

    python benchmarks/refam_shapesref.py                 # ~400 expressions, a few minutes on 2 cores
    python benchmarks/refam_shapesref.py --n 40 --no-write
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _report import machine, write_section
from PIL import Image, ImageDraw

from attnlens import refam, zoo
from attnlens.datasets import shapesref
from attnlens.refam.benchmark import VARIANTS, evaluate, summarise, video_scores
from attnlens.report import markdown_table
from attnlens.zoo.card import model_options

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "img"


def _tile(image: np.ndarray, caption: str, side: int = 128) -> Image.Image:
    """One captioned tile: an RGB uint8 image, or a map scaled to its own range (nearest-neighbour)."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        a = np.stack([a * 255, a * 180 + 40 * (1 - a), 255 * (1 - a)], -1)  # cold blue → hot orange
    tile = Image.fromarray(a.clip(0, 255).astype(np.uint8)).resize((side, side), Image.Resampling.NEAREST)
    framed = Image.new("RGB", (side + 8, side + 24), "white")
    framed.paste(tile, (4, 4))
    ImageDraw.Draw(framed).text((4, side + 8), caption[:22], fill="black")
    return framed


def _row(tiles: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), "white")
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width
    return out


def _stack(rows: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    return out


def figures(pipe: zoo.ShapesPipeline, folder: Path, n: int = 3) -> list[Path]:
    """The docs' figures: each step's maps for a few test expressions, and each ablation's heatmap."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [
        next((s, e) for s, e in shapesref.expressions("test", 60, world=pipe.world) if e.kind == kind)
        for kind in ("colour_shape", "shape", "position")
    ][:n]
    steps = []
    for scene, e in pairs:
        r = refam.segment(scene.image, e.text, model=pipe, **model_options(pipe))
        tiles = [_tile(scene.image, e.text)]
        tiles += [
            _tile(m, f"{layer}")
            for layer, m in zip(r.maps.layer.values, r.maps["target"].values, strict=True)
        ]
        tiles += [_tile(r.maps[k].values, k) for k in ("aggregate", "prior", "heatmap")]
        tiles += [
            _tile(r.mask.astype(np.float32), "mask"),
            _tile(scene.masks[e.target].astype(np.float32), "target"),
        ]
        steps.append(_row(tiles))
    scene, e = pairs[1]
    ablations = [_tile(scene.image, e.text)]
    for name, overrides in VARIANTS.items():
        r = refam.segment(scene.image, e.text, model=pipe, **{**model_options(pipe), **overrides})
        ablations += [_tile(r.heatmap, name), _tile(r.mask.astype(np.float32), "mask")]
    paths = [folder / "refam_steps.png", folder / "refam_ablations.png"]
    _stack(steps).save(paths[0])
    _stack([_row(ablations[i : i + 7]) for i in range(0, len(ablations), 7)]).save(paths[1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="shapes-flux", help="embedded model (or a trained model's folder)")
    parser.add_argument("--n", type=int, default=400, help="test expressions")
    parser.add_argument("--videos", type=int, default=100, help="video test expressions")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave BENCHMARKS.md and the docs alone"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = zoo.load(args.model) if args.model in zoo.available() else zoo.ShapesPipeline.load(args.model)

    began = time.perf_counter()
    options = model_options(pipe)  # chosen on val by the model's card
    rows = evaluate(pipe, shapesref.expressions("test", args.n, world=pipe.world), **options)
    table = summarise(rows)
    video = video_scores(
        pipe, shapesref.expressions("test", args.videos, video=True, world=pipe.world), **options
    )
    seconds = time.perf_counter() - began

    main_rows = table[table.subset.isin(["all", "same-colour distractor"])]
    kinds = table[~table.subset.isin(["all", "same-colour distractor"])].pivot(
        index="variant", columns="subset", values="mIoU"
    )
    markdown = "\n\n".join(
        [
            "## RefAM on ShapesRef (`benchmarks/refam_shapesref.py`)",
            f"Model `{args.model}`; {args.n} test expressions, {args.videos} video test expressions; "
            f"{seconds / 60:.1f} min on {machine()}, {args.threads} torch thread(s). Options shared by "
            f"every variant (chosen on the val split): `{options}`.",
            "Images: every variant and baseline, on all expressions and on those whose target shares "
            "its colour with another object.",
            markdown_table(main_rows),
            "mIoU per expression kind:",
            markdown_table(kinds.reset_index()),
            "Video (frame by frame, J = region IoU, F = boundary F-measure at DAVIS' tolerance):",
            markdown_table(video),
        ]
    )
    print(markdown)
    if not args.no_write:
        write_section("refam_shapesref", markdown)
        print("figures:", *figures(pipe, FIGURES))


if __name__ == "__main__":
    main()
