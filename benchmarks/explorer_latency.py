"""How long ``attnlens.explore`` takes to redraw after each control changes, on a store of a few hundred MB.

The store holds the embedded model's attention while it draws ``--scenes`` ShapesRef captions in
``--steps`` steps, every head kept (``cross``, ``text_to_image``, ``key_mass``): about 8 MB a
caption at 28 steps. The explorer reads only the chosen slice and keeps what it read, so each
control is timed twice: the first change reads from the store (cold), changing back and forth
again reads nothing (cached). A sample change also finds that sample's sinks and magnets once.

    python benchmarks/explorer_latency.py                  # ~40 captions: some minutes on 2 cores
    python benchmarks/explorer_latency.py --store S.zarr   # time an existing store

Results print as a Markdown section, which replaces this benchmark's section of BENCHMARKS.md
unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from _report import machine, write_section

import attnlens
from attnlens import zoo
from attnlens.datasets import shapesref
from attnlens.store import stored_bytes
from attnlens.viz.report import markdown_table


def build(path: Path, scenes: int, steps: int) -> None:
    pipe = zoo.load("shapes-flux")
    shutil.rmtree(path, ignore_errors=True)
    with attnlens.capture(pipe, keep=("cross", "text_to_image", "key_mass"), store=str(path)) as cap:
        for i, scene in enumerate(shapesref.split("test", n=scenes, world=pipe.world)):
            with cap.sample(f"scene-{i}"):
                pipe(scene.caption, num_inference_steps=steps, generator=torch.Generator().manual_seed(i))


def time_controls(path: Path, repeats: int) -> pd.DataFrame:
    ds = attnlens.open_store(str(path))
    start = time.perf_counter()
    ex = attnlens.explore(ds)
    opened = time.perf_counter() - start
    c = ex.controls
    changes = {
        "sample": [1, 0],
        "step": [3, "mean"],
        "layer": [str(ds.layer.values[1]), "*"],
        "head": ["0", "mean"],
        "word": [w for w in c["word"].options if w != c["word"].value][:2],
        "kind": ["sink ratio", "cross"],
    }
    rows = [{"control": "open the explorer", "cold (s)": opened, "cached (s)": float("nan")}]
    for name, (there, back) in changes.items():
        times = []
        for value in [there, back] * repeats:
            start = time.perf_counter()
            c[name].value = value
            times.append(time.perf_counter() - start)
        rows.append({"control": name, "cold (s)": times[0], "cached (s)": statistics.median(times[2:])})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("build/explorer-latency.zarr"))
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not args.store.exists():
        build(args.store, args.scenes, args.steps)
    ds = attnlens.open_store(str(args.store))
    size = sum(stored_bytes(str(args.store)).values()) / 2**20
    memory = sum(v.nbytes for v in ds.data_vars.values()) / 2**20
    table = time_controls(args.store, args.repeats)
    text = (
        "## Explorer latency\n\n"
        f"`python benchmarks/explorer_latency.py` on {machine()}: a store of {ds.sizes['sample']} captions × "
        f"{ds.sizes['step']} steps × {ds.sizes['layer']} layers × {ds.sizes['head']} heads, "
        f"{memory:.0f} MB of arrays ({size:.0f} MB on disk). Seconds from changing a control to the "
        "redrawn figure; cold reads the slice from the store, cached is the median of changing back "
        "and forth again.\n\n" + markdown_table(table)
    )
    print(text)
    if not args.no_write:
        write_section("explorer-latency", text)


if __name__ == "__main__":
    main()
