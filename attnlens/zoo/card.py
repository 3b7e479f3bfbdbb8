"""Measure an embedded model against ShapesRef's bars and write its model card.

    attnlens zoo card runs/shapes-flux        # writes card.md and claims.json into that folder

The noise level is chosen on the val split (best phrase mIoU), then everything is measured on
the test split: the word maps of the trained and the untrained model beside the baselines that
need no model, per layer and per noise level; generation read back by a classifier trained on
real scenes; and the sink ratios of every token per layer. ``claims.json`` keeps the figures of
a small frozen subset, which the test suite measures again on the shipped weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..analysis import find_sinks, sinks_by_layer
from ..capture import capture
from ..datasets import shapesref
from ..report import markdown_table
from .evaluate import generation, grounding, summarise, train_readout
from .shapes import ShapesPipeline

__all__ = ["CLAIM_SUBSET", "Measurements", "bars", "claims", "measure", "write_card"]

#: the frozen subset the test suite re-measures: the first test expressions
CLAIM_SUBSET = 80
_TOLERANCE = 0.03


@dataclass
class Measurements:
    """What :func:`measure` found; every table is a :func:`~attnlens.zoo.evaluate.summarise` frame.

    Attributes:
        t: the noise level chosen on val.
        val: phrase mIoU on val per noise level.
        test: the trained model's test table at every noise level (column ``t``).
        untrained: the untrained model's test table at ``t``.
        generation: colour and shape read-back rates of trained and untrained models, and the
            readout's own accuracy on real scenes.
        sinks: :func:`~attnlens.analysis.sinks_by_layer` of sampled captions.
        claims: :func:`claims` of the trained model, and the ``subset`` size they were measured on.
    """

    t: float
    val: dict[float, float]
    test: pd.DataFrame
    untrained: pd.DataFrame
    generation: dict[str, float]
    sinks: pd.DataFrame
    claims: dict[str, Any]


def _pick(table: pd.DataFrame, model: str, words: str, subset: str, metric: str) -> float:
    row = table[(table.model == model) & (table.words == words) & (table.subset == subset)]
    return float(row[metric].iloc[0]) if len(row) else float("nan")


def claims(pipe: ShapesPipeline, t: float, n: int = CLAIM_SUBSET) -> dict[str, float]:
    """The figures of ``pipe`` on the first ``n`` test expressions: word maps at noise level ``t``,
    and the mIoU of RefAM (with :data:`~attnlens.refam.benchmark.SHAPESREF_OPTIONS`) and of the
    head noun's raw map."""
    from ..refam.benchmark import SHAPESREF_OPTIONS, VARIANTS, evaluate

    pairs = list(shapesref.expressions("test", n))
    table = summarise(grounding(pipe, pairs, t=t), pipe.config.patch, "model")
    chosen = {k: VARIANTS[k] for k in ("RefAM", "attention only, head noun")}
    refam = evaluate(pipe, pairs, chosen, progress=False, **SHAPESREF_OPTIONS).groupby("variant").iou.mean()
    return {
        "RefAM mIoU": float(refam["RefAM"]),
        "head-noun attention-only mIoU": float(refam["attention only, head noun"]),
        "phrase mIoU": _pick(table, "model", "phrase", "all", "mIoU"),
        "colour pointing, colour unique": _pick(table, "model", "colour", "colour unique", "pointing"),
        "noun pointing, same-colour distractor": _pick(
            table, "model", "noun", "same-colour distractor", "pointing"
        ),
    }


def measure(
    pipe: ShapesPipeline,
    *,
    ts: tuple[float, ...] = (0.3, 0.5, 0.7),
    n_val: int = 200,
    n_test: int = 400,
    prompts: int = 120,
    readout_scenes: int = 6000,
    sink_scenes: int = 16,
    claim_subset: int = CLAIM_SUBSET,
    seed: int = 0,
) -> Measurements:
    """Run every measurement of the card (a few minutes on 2 CPU cores for the shapes models).

    ``n_val``/``n_test`` expressions, ``prompts`` generated images read back by a readout
    trained on ``readout_scenes`` real scenes, ``sink_scenes`` sampled captions for the sinks,
    and the claims on the first ``claim_subset`` test expressions.
    """
    val = {}
    for t in ts:
        table = summarise(
            grounding(pipe, shapesref.expressions("val", n_val), t=t), pipe.config.patch, "m", False
        )
        val[t] = _pick(table, "m", "phrase", "all", "mIoU")
    best = max(val, key=val.get)
    pairs = list(shapesref.expressions("test", n_test))
    test = pd.concat(
        [summarise(grounding(pipe, pairs, t=t), pipe.config.patch, "trained").assign(t=t) for t in ts]
    )
    untrained_pipe = ShapesPipeline.untrained(pipe.config, seed=seed + 1).to(pipe.device)
    untrained = summarise(grounding(untrained_pipe, pairs, t=best), pipe.config.patch, "untrained")
    readout, accuracy = train_readout(readout_scenes, seed=seed)
    drawn = generation(pipe, readout, n=prompts, seed=seed)
    blind = generation(untrained_pipe, readout, n=prompts, seed=seed)
    with capture(pipe, keep="key_mass") as cap:
        for scene in shapesref.split("test", n=sink_scenes):
            cap.next_sample()
            pipe(scene.caption, num_inference_steps=8)
    sinks = sinks_by_layer(find_sinks(cap.result), cap.result)
    return Measurements(
        t=best,
        val=val,
        test=test,
        untrained=untrained,
        generation={
            "readout accuracy on real scenes": accuracy,
            "colour read back": float(drawn.colour_ok.mean()),
            "shape read back": float(drawn.shape_ok.mean()),
            "colour read back, untrained": float(blind.colour_ok.mean()),
            "shape read back, untrained": float(blind.shape_ok.mean()),
        },
        sinks=sinks,
        claims={"subset": claim_subset, **claims(pipe, best, claim_subset)},
    )


def bars(m: Measurements) -> pd.DataFrame:
    """The Must and Aim bars of ShapesRef, measured: one row each with ``met``."""
    at = m.test[m.test.t == m.t]
    phrase = _pick(at, "trained", "phrase", "all", "mIoU")
    # the token-grid ceiling bounds an unrefined map from above; colour lookup is the bar of the Aims
    beat = [b for b in shapesref.BASELINES if b not in ("token-grid ceiling", "colour lookup")]
    baselines = {b: _pick(at, b, "-", "all", "mIoU") for b in beat}
    baselines["untrained model"] = _pick(m.untrained, "untrained", "phrase", "all", "mIoU")
    strongest = max(baselines, key=baselines.get)
    distractor = "same-colour distractor"
    grounded = _pick(at, "trained", "phrase", distractor, "mIoU")
    lookup = _pick(at, "colour lookup", "-", distractor, "mIoU")

    def above(value: float, floor: float, name: str) -> tuple:  # strictly better than a baseline
        return value, f"> {floor:.3f} ({name})", value > floor

    def at_least(value: float, floor: float) -> tuple:
        return value, f"≥ {floor:.2f}", value >= floor

    rows = [
        ("must", "phrase mIoU above the untrained model, whole image, centre box and union of objects",
         *above(phrase, baselines[strongest], strongest)),
        ("must", "colour-word pointing where the colour is unique",
         *at_least(_pick(at, "trained", "colour", "colour unique", "pointing"), 0.9)),
        ("must", "generated colour read back", *at_least(m.generation["colour read back"], 0.9)),
        ("aim", "noun pointing, same-colour-distractor expressions",
         *at_least(_pick(at, "trained", "noun", distractor, "pointing"), 0.8)),
        ("aim", "phrase mIoU above colour lookup, same-colour-distractor expressions",
         *above(grounded, lookup, "colour lookup")),
        ("aim", "generated shape read back", *at_least(m.generation["shape read back"], 0.8)),
    ]  # fmt: skip
    frame = pd.DataFrame(rows, columns=["level", "bar", "measured", "required", "met"])
    return frame.astype({"met": bool})


def write_card(folder: str | Path, name: str, m: Measurements) -> Path:
    """Write ``card.md``, ``claims.json`` and ``bars.json`` into a trained model's ``folder`` (beside its
    ``config.json`` and ``train_log.json``)."""
    folder = Path(folder)
    log = json.loads((folder / "train_log.json").read_text())
    met = bars(m)
    at = m.test[(m.test.t == m.t) & (m.test.subset.isin(["all", "same-colour distractor", "colour unique"]))]
    headline = at[~at.model.str.contains(r"\[")].drop(columns="t")
    untrained = m.untrained[(m.untrained.subset == "all") & ~m.untrained.model.str.contains(r"\[")]
    per_layer = m.test[(m.test.subset == "all") & (m.test.words != "-")]
    loss = pd.DataFrame(log["loss"], columns=["step", "loss"])
    curve = loss.groupby(loss.step // max(1, log["steps"] // 20) * max(1, log["steps"] // 20)).loss.mean()
    lines = [
        f"# {name}",
        "",
        f"A `FluxTransformer2DModel` with a learned word encoder, trained by attnlens from scratch with "
        f"rectified flow on the ShapesRef `train` split. Load it offline with `attnlens.zoo.load({name!r})`.",
        "",
        "## Bars",
        "",
        markdown_table(met),
        "",
        f"Met: {', '.join(met[met.met].bar) or 'none'}. Not met: {', '.join(met[~met.met].bar) or 'none'}.",
        "",
        "## Training",
        "",
        f"- config: `{json.dumps(log['model_config'])}`",
        f"- recipe: `{json.dumps(log['train_config'])}`",
        f"- {log['steps']} steps, {log['images_seen']} images, "
        f"{log['wall_seconds'] / 60:.0f} min on {log['hardware']}",
        "",
        "Loss (mean per window of steps):",
        "",
        markdown_table(curve.reset_index().rename(columns={"step": "from step"})),
        "",
        f"## Grounding on the test split (t = {m.t}, chosen on val: "
        + ", ".join(f"t={t}: {v:.3f}" for t, v in m.val.items())
        + ")",
        "",
        markdown_table(pd.concat([headline, untrained])),
        "",
        "Per layer and noise level (subset: all):",
        "",
        markdown_table(per_layer),
        "",
        "## Generation",
        "",
        markdown_table(pd.DataFrame([m.generation])),
        "",
        "## Sinks (sampled test captions, 8 steps)",
        "",
        markdown_table(m.sinks),
        "",
    ]  # fmt: skip
    (folder / "card.md").write_text("\n".join(lines))
    figures = {k: v for k, v in m.claims.items() if k != "subset"}
    claimed = {"t": m.t, "subset": m.claims["subset"], "tolerance": _TOLERANCE, "figures": figures}
    (folder / "claims.json").write_text(json.dumps(claimed, indent=1) + "\n")
    (folder / "bars.json").write_text(met.to_json(orient="records", indent=1))
    return folder / "card.md"
