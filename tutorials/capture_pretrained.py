"""Capture a FLUX checkpoint's image→text attention and save one heatmap per word.

    python tutorials/capture_pretrained.py black-forest-labs/FLUX.1-schnell "a red mug on a table" --out maps

The model is loaded with ``FluxPipeline.from_pretrained`` from a hub id or a local folder, so
any checkpoint you have on disk works offline. Heatmaps are the mean over double-stream
layers and heads at the last denoising step, written as one self-contained HTML file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import plotly.express as px
import torch

import attnlens


def word_maps(ds):
    """Mean map of each content word at the last step: DataArray (word, y, x)."""
    last = ds.cross.isel(sample=0, step=-1).mean(("layer", "head"))  # (query, key_text)
    content = last.token_kind == "content"
    per_word = last.isel(key_text=content.values).groupby("word").mean("key_text")  # (word, query)
    return per_word.set_index(query=["y", "x"]).unstack("query")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="hub id or local folder of a FluxPipeline")
    parser.add_argument("prompt")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    parser.add_argument("--out", type=Path, default=Path("maps"))
    args = parser.parse_args(argv)

    from diffusers import FluxPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    with attnlens.capture(
        pipe, layers="double.*", heads="mean", keep="cross", timesteps=[args.steps - 1]
    ) as cap:
        pipe(args.prompt, height=args.size, width=args.size, num_inference_steps=args.steps)
    maps = word_maps(cap.result)
    args.out.mkdir(parents=True, exist_ok=True)
    fig = px.imshow(maps, facet_col="word", facet_col_wrap=4, color_continuous_scale="magma")
    path = args.out / "word_maps.html"
    fig.write_html(path, include_plotlyjs=True)
    print(f"{len(maps.word)} word maps of {maps.sizes['y']}×{maps.sizes['x']} tokens → {path}")
    return path


if __name__ == "__main__":
    main()
