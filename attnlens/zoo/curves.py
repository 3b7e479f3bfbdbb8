"""Learning curves: each EMA snapshot of a training run measured by one yardstick.

A run folder written by :func:`~attnlens.zoo.train.train` holds ``snapshots/<step>/``; every
snapshot is measured on its world's ``val`` split and the measurements are appended to
``curve.json`` beside the checkpoint, so an interrupted measurement resumes and a curve grows
with its run. One point:

- ``shape``, ``colour``: generated one-object images whose shape (colour) a readout trained on
  real scenes reads back right (:func:`~attnlens.zoo.evaluate.generation`);
- ``noun pointing, same colour``: the head noun's raw map peaks inside the target, on val
  expressions where another object shares the target's colour (a colour-only map gets about
  0.47 of these);
- ``RefAM``, ``attention only``: mIoU of RefAM with :data:`CURVE_OPTIONS` and of the raw phrase
  map thresholded (:data:`~attnlens.refam.benchmark.VARIANTS`);
- ``largest GAS share``: the largest share of a layer's attention that global attention sinks
  take while the model draws (:func:`sinks_while_drawing`).

    attnlens zoo curve runs/shape-first
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from ..analysis import find_sinks, sinks_by_layer
from ..capture import capture
from ..datasets import shapesref
from .evaluate import generation, grounding, summarise, train_readout
from .shapes import ShapesPipeline

__all__ = ["CURVE_OPTIONS", "curve", "curve_point", "sinks_while_drawing"]

#: RefAM's options along every curve, fixed so that points compare
CURVE_OPTIONS: dict[str, Any] = {"targets": "phrase", "t": 0.3}


def sinks_while_drawing(pipe: ShapesPipeline, n: int = 16, steps: int = 8) -> pd.DataFrame:
    """:func:`~attnlens.analysis.sinks_by_layer` of ``key_mass`` captured while ``pipe`` draws the
    captions of the first ``n`` test scenes of its world in ``steps`` steps."""
    with capture(pipe, keep="key_mass") as cap:
        for scene in shapesref.split("test", n=n, world=pipe.world):
            cap.next_sample()
            pipe(scene.caption, num_inference_steps=steps)
    return sinks_by_layer(find_sinks(cap.result), cap.result)


def curve_point(
    pipe: ShapesPipeline, *, n_val: int = 200, prompts: int = 64, sink_scenes: int = 16, seed: int = 0
) -> dict[str, float]:
    """One point of a learning curve (see the module docstring) for ``pipe``."""
    from ..refam.benchmark import VARIANTS, evaluate

    readout, _ = train_readout(world=pipe.world)
    drawn = generation(pipe, readout, n=prompts, seed=seed)
    pairs = list(shapesref.expressions("val", n_val, world=pipe.world))
    maps = summarise(grounding(pipe, pairs, t=CURVE_OPTIONS["t"]), pipe.config.patch, "m")
    noun = maps[(maps.model == "m") & (maps.words == "noun") & (maps.subset == "same-colour distractor")]
    variants = {k: VARIANTS[k] for k in ("RefAM", "attention only")}
    refam = evaluate(pipe, pairs, variants, progress=False, **CURVE_OPTIONS).groupby("variant").iou.mean()
    return {
        "shape": float(drawn.shape_ok.mean()),
        "colour": float(drawn.colour_ok.mean()),
        "noun pointing, same colour": float(noun.pointing.iloc[0]) if len(noun) else float("nan"),
        "RefAM": float(refam["RefAM"]),
        "attention only": float(refam["attention only"]),
        "union of objects": float(refam["union of objects"]),
        "colour lookup": float(refam["colour lookup"]),
        "largest GAS share": float(sinks_while_drawing(pipe, sink_scenes).gas_share.max()),
    }


def curve(folder: str | Path, *, progress: bool = True, **point: Any) -> pd.DataFrame:
    """Measure every snapshot of the run in ``folder`` not yet in its ``curve.json``; return the
    whole curve, one row per snapshot: ``step``, ``images`` and the :func:`curve_point` figures.

    ``point`` goes to :func:`curve_point` (and must stay the same along one curve).
    """
    folder = Path(folder)
    snapshots = sorted(p for p in (folder / "snapshots").glob("*") if (p / "model.safetensors").exists())
    if not snapshots:
        raise FileNotFoundError(f"{folder / 'snapshots'} holds no snapshot: is {folder} a training run?")
    path = folder / "curve.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {row["step"] for row in rows}
    batch = json.loads((folder / "run.json").read_text())["train_config"]["batch"]
    for snap in tqdm([s for s in snapshots if int(s.name) not in done], desc="curve", disable=not progress):
        step = int(snap.name)
        rows.append({"step": step, "images": step * batch, **curve_point(ShapesPipeline.load(snap), **point)})
        rows.sort(key=lambda r: r["step"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        tmp.replace(path)
    return pd.DataFrame(rows)
