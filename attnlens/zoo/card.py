"""Measure an embedded model against ShapesRef's bars and write its model card.

    attnlens zoo card runs/shape-first --curves runs/words runs/shape-first runs/minilm

Everything is measured on the model's own world (:attr:`ShapesPipeline.world`):

1. RefAM's options are chosen on the ``val`` split, one option of :data:`OPTION_GRID` at a time
   (each kept at its best val mIoU before the next is tried), starting from the model's own;
2. on the ``test`` split, RefAM and each of its ablations run with :data:`SEEDS` noise seeds
   (mean and spread), beside the baselines that need no model (union of objects, colour lookup);
3. on scenes drawn with seeds outside every split (:func:`heldout_pairs`), RefAM against a colour
   lookup, as a new user would try it;
4. the raw word maps: how often the head noun's map peaks inside its object where another object
   shares its colour;
5. generation: one-object prompts drawn, a readout trained on real scenes reads them back, for
   the trained and an untrained model;
6. video: RefAM on the world's video test split, the image model run frame by frame (J&F), beside
   the baselines drawn frame by frame (no video model is trained on ShapesRef);
7. sinks while drawing; and the claims, a small frozen subset the test suite measures again.

``write_card`` writes ``card.md``, ``bars.json``, ``claims.json`` and ``refam.json`` (the chosen
options, which :func:`attnlens.refam.segment` starts from when given this model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..datasets import shapesref
from ..report import markdown_table
from .curves import sinks_while_drawing
from .evaluate import generation, grounding, summarise, train_readout
from .shapes import ShapesPipeline

__all__ = [
    "CLAIM_SUBSET",
    "OPTION_GRID",
    "SEEDS",
    "Measurements",
    "bars",
    "choose_options",
    "claims",
    "heldout_pairs",
    "measure",
    "write_card",
]

#: the frozen subset the test suite re-measures: the first test expressions
CLAIM_SUBSET = 80
_TOLERANCE = 0.03
#: noise seeds of every RefAM measurement on test
SEEDS = (0, 1, 2)
#: RefAM's options tried on val, in this order, one at a time; ``refiner`` and ``prompts``: the
#: threshold refiner or the region segmenter (SAM's model-free stand-in on flat-coloured scenes),
#: prompted at the heatmap's peak or at the grid cell whose segment holds the most heat (a grid
#: with the threshold refiner is refused and scores nothing); ``layers``: all, the double-stream
#: blocks or the single-stream blocks (the paper compares depths; sinks grow in the deeper ones)
OPTION_GRID: dict[str, tuple[Any, ...]] = {
    "refiner": ("threshold", "region"),
    "prompts": ("peaks", "grid"),
    "t": (0.3, 0.5, 0.7),
    "layers": (None, "double.*", "single.*"),
    "text_share": (True, False),
    "targets": ("phrase", "head"),
    "gas": ("suppress", "redirect", "none"),
    "gas_spare_targets": (True, False),
    "prior_floor": (0.1, 0.0, 0.3),
}
#: ablations measured on test beside :data:`~attnlens.refam.benchmark.VARIANTS`
EXTRA_ABLATIONS: dict[str, dict[str, Any]] = {
    "GAS handling on the target's tokens too": {"gas_spare_targets": False},
    "spatial prior without a floor": {"prior_floor": 0.0},
    "raw probabilities (no text shares)": {"text_share": False},
    "peak point (no grid of prompts)": {"prompts": "peaks"},
    "threshold refiner (no segmenter)": {"refiner": "threshold", "prompts": "peaks"},
}
_DISTRACTOR = "same-colour distractor"


@dataclass
class Measurements:
    """What :func:`measure` found.

    Attributes:
        options: RefAM's options chosen on val.
        selection: every val trial: ``option``, ``value``, ``mIoU``, ``chosen``.
        test: RefAM, its ablations and the baselines on test: ``variant``, ``subset``, ``n``,
            ``mIoU`` (mean over seeds), ``spread`` (standard deviation over seeds), ``pointing``.
        heldout: the same for :func:`heldout_pairs` (RefAM and the baselines, seed 0).
        maps: :func:`~attnlens.zoo.evaluate.summarise` of the raw word maps on test.
        generation: read-back rates of the trained and an untrained model, and the readout's own
            accuracy on real scenes.
        video: :func:`~attnlens.refam.benchmark.video_scores` on video test expressions.
        sinks: :func:`~attnlens.zoo.curves.sinks_while_drawing`.
        claims: :func:`claims` of the trained model, and the ``subset`` size they were measured on.
        seeds: the noise seeds of the test measurements.
    """

    options: dict[str, Any]
    selection: pd.DataFrame
    test: pd.DataFrame
    heldout: pd.DataFrame
    maps: pd.DataFrame
    generation: dict[str, float]
    video: pd.DataFrame
    sinks: pd.DataFrame
    claims: dict[str, Any]
    seeds: tuple[int, ...] = SEEDS


def model_options(pipe: ShapesPipeline) -> dict[str, Any]:
    """RefAM's options for ``pipe``: those chosen for it on val (``refam.json``), else the defaults."""
    from ..refam.benchmark import SHAPESREF_OPTIONS

    return dict(getattr(pipe, "refam_options", None) or SHAPESREF_OPTIONS)


def claims(
    pipe: ShapesPipeline, n: int = CLAIM_SUBSET, options: dict[str, Any] | None = None
) -> dict[str, float]:
    """The figures of ``pipe`` on the first ``n`` test expressions of its world, with RefAM's
    ``options`` (default :func:`model_options`): word maps at their noise level ``t``, and the mIoU
    of RefAM (also on the same-colour-distractor expressions) and of the head noun's raw map."""
    from ..refam.benchmark import VARIANTS, evaluate

    options = model_options(pipe) if options is None else options
    pairs = list(shapesref.expressions("test", n, world=pipe.world))
    table = summarise(grounding(pipe, pairs, t=options.get("t", 0.5)), pipe.config.patch, "model")
    chosen = {k: VARIANTS[k] for k in ("RefAM", "attention only, head noun")}
    rows = evaluate(pipe, pairs, chosen, progress=False, **options)
    refam = rows.groupby("variant").iou.mean()
    distractor = rows[(rows.variant == "RefAM") & rows.same_colour_distractor].iou.mean()
    return {
        "RefAM mIoU": float(refam["RefAM"]),
        "RefAM mIoU, same-colour distractor": float(distractor),
        "head-noun attention-only mIoU": float(refam["attention only, head noun"]),
        "phrase mIoU": _pick(table, "model", "phrase", "all", "mIoU"),
        "colour pointing, colour unique": _pick(table, "model", "colour", "colour unique", "pointing"),
        "noun pointing, same-colour distractor": _pick(table, "model", "noun", _DISTRACTOR, "pointing"),
    }


def choose_options(
    pipe: ShapesPipeline, pairs: list, start: dict[str, Any] | None = None, progress: bool = False
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Choose RefAM's options on ``pairs`` (val), one :data:`OPTION_GRID` option at a time.

    Returns the chosen options and one row per trial (``option``, ``value``, ``mIoU``, ``chosen``).
    """
    from ..refam.benchmark import evaluate
    from ..refam.errors import SegmenterMismatchError

    options = dict(start if start is not None else model_options(pipe))
    seen: dict[tuple, float] = {}
    rows = []

    def score(opts: dict[str, Any]) -> float:
        key = tuple(sorted((k, repr(v)) for k, v in opts.items()))
        if key not in seen:
            try:
                result = evaluate(pipe, pairs, {"RefAM": {}}, progress=False, **opts)
                seen[key] = float(result[result.variant == "RefAM"].iou.mean())
            except SegmenterMismatchError:  # e.g. a grid of prompts for the threshold refiner
                seen[key] = float("nan")
        return seen[key]

    for option, values in tqdm(OPTION_GRID.items(), desc="choosing options on val", disable=not progress):
        trials = {v: score({**options, option: v}) for v in values}
        best = max(trials, key=lambda v: (np.nan_to_num(trials[v], nan=-1.0), v == options.get(option)))
        options[option] = best
        rows += [dict(option=option, value=repr(v), mIoU=m, chosen=v == best) for v, m in trials.items()]
    return options, pd.DataFrame(rows)


def heldout_pairs(world: shapesref.World | str, n: int = 200) -> list[tuple[shapesref.Scene, Any]]:
    """``n`` (scene, expression) pairs on three-object scenes drawn with seeds outside every split:
    the colour-and-shape expressions (``"the red circle"``) a new user would try first."""
    pairs: list[tuple[shapesref.Scene, Any]] = []
    for i in range(10 * n):
        scene = shapesref.make_scene(np.random.default_rng([7919, i]), n_objects=3, world=world)
        pairs += [(scene, e) for e in scene.expressions if e.kind == "colour_shape"][:1]
        if len(pairs) == n:
            break
    return pairs


def _scores(pipe, pairs, variants, options, seeds, progress) -> pd.DataFrame:
    """:func:`~attnlens.refam.benchmark.summarise` per seed, then mean and spread over seeds."""
    from ..refam.benchmark import evaluate
    from ..refam.benchmark import summarise as summarise_rows

    tables = []
    for seed in tqdm(seeds, desc="RefAM on test", disable=not progress):
        rows = evaluate(pipe, pairs, variants, progress=False, **{**options, "seed": seed})
        tables.append(summarise_rows(rows).assign(seed=seed))
    per_seed = pd.concat(tables)
    keys = ["variant", "subset"]
    out = per_seed.groupby(keys, sort=False).agg(
        n=("n", "first"), mIoU=("mIoU", "mean"), spread=("mIoU", "std"), pointing=("pointing", "mean")
    )
    return out.reset_index().fillna({"spread": 0.0})


def measure(
    pipe: ShapesPipeline,
    *,
    n_val: int = 200,
    n_test: int = 400,
    n_heldout: int = 200,
    n_video: int = 50,
    prompts: int = 120,
    sink_scenes: int = 16,
    claim_subset: int = CLAIM_SUBSET,
    seeds: tuple[int, ...] = SEEDS,
    progress: bool = False,
) -> Measurements:
    """Run every measurement of the card (the module docstring lists them; a quarter of an hour
    on 2 CPU cores for a 32-pixel model)."""
    from ..refam.benchmark import VARIANTS, video_scores

    world = pipe.world
    val = list(shapesref.expressions("val", n_val, world=world))
    options, selection = choose_options(pipe, val, progress=progress)
    pairs = list(shapesref.expressions("test", n_test, world=world))
    variants = {**VARIANTS, **EXTRA_ABLATIONS}
    test = _scores(pipe, pairs, variants, options, seeds, progress)
    heldout = _scores(pipe, heldout_pairs(world, n_heldout), {"RefAM": {}}, options, seeds[:1], progress)
    maps = summarise(grounding(pipe, pairs, t=options.get("t", 0.5)), pipe.config.patch, "trained")
    untrained = ShapesPipeline.untrained(pipe.config, seed=1).to(pipe.device)
    readout, accuracy = train_readout(world=world)
    drawn = generation(pipe, readout, n=prompts)
    blind = generation(untrained, readout, n=prompts)
    clips = list(shapesref.expressions("test", n_video, video=True, world=world))
    video = video_scores(pipe, clips, progress=progress, **options)
    return Measurements(
        options=options,
        selection=selection,
        test=test,
        heldout=heldout,
        maps=maps,
        generation={
            "readout accuracy on real scenes": accuracy,
            "colour read back": float(drawn.colour_ok.mean()),
            "shape read back": float(drawn.shape_ok.mean()),
            "colour read back, untrained": float(blind.colour_ok.mean()),
            "shape read back, untrained": float(blind.shape_ok.mean()),
        },
        video=video,
        sinks=sinks_while_drawing(pipe, n=sink_scenes),
        claims={"subset": claim_subset, **claims(pipe, claim_subset, options)},
        seeds=tuple(seeds),
    )


def _pick(table: pd.DataFrame, model: str, words: str, subset: str, metric: str) -> float:
    row = table[(table.model == model) & (table.words == words) & (table.subset == subset)]
    return float(row[metric].iloc[0]) if len(row) else float("nan")


def _score(table: pd.DataFrame, variant: str, subset: str = "all", metric: str = "mIoU") -> float:
    row = table[(table.variant == variant) & (table.subset == subset)]
    return float(row[metric].iloc[0]) if len(row) else float("nan")


def bars(m: Measurements) -> pd.DataFrame:
    """ShapesRef's Must and Aim bars, measured: one row each with ``met`` (the GAS row is a finding,
    either way, and is always met)."""
    from ..refam.benchmark import VARIANTS

    refam, spread = _score(m.test, "RefAM"), _score(m.test, "RefAM", metric="spread")

    def changes_nothing(v: str) -> bool:  # e.g. the chosen options already leave its step out
        return _score(m.test, v) == refam and _score(m.test, v, metric="spread") == spread

    tried = [v for v in (*VARIANTS, *EXTRA_ABLATIONS) if v != "RefAM" and v in set(m.test.variant)]
    ablations = [v for v in tried if not changes_nothing(v)]
    margins = {
        v: refam - _score(m.test, v) - max(spread, _score(m.test, v, metric="spread")) for v in ablations
    }
    weakest = min(margins, key=margins.get) if margins else "none"
    gas = float(m.sinks.gas_share.max()) if len(m.sinks) else 0.0

    def above(value: float, floor: float, name: str) -> tuple:  # strictly better than a baseline
        return value, f"> {floor:.3f} ({name})", value > floor

    def at_least(value: float, floor: float) -> tuple:
        return value, f"≥ {floor:.2f}", value >= floor

    rows = [
        ("must", "generated shape read back", *at_least(m.generation["shape read back"], 0.8)),
        ("must", "generated colour read back", *at_least(m.generation["colour read back"], 0.9)),
        ("must", "RefAM mIoU above the union of objects (test)",
         *above(refam, _score(m.test, "union of objects"), "union of objects")),
        ("must", "RefAM mIoU above its attention-only baseline (test)",
         *above(refam, _score(m.test, "attention only"), "attention only")),
        ("aim", "head noun points inside its object, same-colour distractor (test)",
         *at_least(_pick(m.maps, "trained", "noun", _DISTRACTOR, "pointing"), 0.7)),
        ("aim", "RefAM above colour lookup, same-colour distractor (test)",
         *above(_score(m.test, "RefAM", _DISTRACTOR), _score(m.test, "colour lookup", _DISTRACTOR),
                "colour lookup")),
        ("aim", "RefAM above colour lookup, scenes outside every split",
         *above(_score(m.heldout, "RefAM"), _score(m.heldout, "colour lookup"), "colour lookup")),
        ("aim", f"RefAM beats every ablation by more than its spread over {len(m.seeds)} seeds",
         margins.get(weakest, np.nan),
         f"> 0 (weakest: {weakest}; {len(tried) - len(ablations)} that change no mask left out)",
         bool(margins) and margins[weakest] > 0),
        ("finding", "largest share of a layer's attention taken by global attention sinks",
         gas, "a GAS takes ≥ 10 %: " + ("yes" if gas >= 0.1 else "no"), True),
    ]  # fmt: skip
    frame = pd.DataFrame(rows, columns=["level", "bar", "measured", "required", "met"])
    return frame.astype({"met": bool})


def _loader(folder: Path, name: str) -> str:
    """How a reader of the card loads the model: by zoo name once shipped, else from its folder."""
    from . import available

    if name in available():
        return f"`attnlens.zoo.load({name!r})`"
    return f"`attnlens.zoo.ShapesPipeline.load({str(folder)!r})`"


def write_card(
    folder: str | Path, name: str, m: Measurements, curves: dict[str, pd.DataFrame] | None = None
) -> Path:
    """Write ``card.md``, ``bars.json``, ``claims.json`` and ``refam.json`` into a trained model's
    ``folder`` (beside its ``config.json`` and ``train_log.json``); ``curves`` (recipe → curve,
    :func:`~attnlens.zoo.curves.curve`) go into the card too."""
    folder = Path(folder)
    log = json.loads((folder / "train_log.json").read_text())
    met = bars(m)
    runs = pd.DataFrame(log.get("runs", []))
    subsets = ["all", _DISTRACTOR]
    test = m.test[m.test.subset.isin(subsets)]
    loss = pd.DataFrame(log["loss"], columns=["step", "loss"])
    window = max(1, log["steps"] // 20)
    curve = loss.groupby(loss.step // window * window).loss.mean()
    lines = [
        f"# {name}",
        "",
        f"A `FluxTransformer2DModel` trained by attnlens from scratch with rectified flow on the "
        f"ShapesRef world `{log['model_config'].get('world', 'v1')}`. "
        f"Load it offline with {_loader(folder, name)}.",
        "",
        "## Bars",
        "",
        markdown_table(met),
        "",
        f"Met: {', '.join(met[met.met & (met.level != 'finding')].bar) or 'none'}. "
        f"Not met: {', '.join(met[~met.met].bar) or 'none'}.",
        "",
        "## RefAM on the test split",
        "",
        f"Options chosen on val: `{json.dumps(m.options)}`. mIoU is the mean over seeds "
        f"{', '.join(map(str, m.seeds))}; spread is their standard deviation; pointing is the share "
        "of heatmaps whose hottest pixel lies inside the target. The region segmenter "
        "(`refiner='region'`, SAM's stand-in) cuts its mask out of the clean image's flat colours: "
        "'random object' is what such a perfect segmenter scores when nothing tells it which "
        "object is meant, so RefAM's margin over it is what the attention adds.",
        "",
        markdown_table(test),
        "",
        "On scenes drawn outside every split (three objects, colour-and-shape expressions):",
        "",
        markdown_table(m.heldout[m.heldout.subset.isin(subsets)].drop(columns="spread")),
        "",
        "Option choice on val (RefAM mIoU per trial):",
        "",
        markdown_table(m.selection),
        "",
        f"## Video, frame by frame ({int(m.video.n.max()) if len(m.video) else 0} test expressions)",
        "",
        "No video model is trained on ShapesRef: offline, RefAM on video runs this image model on each "
        "frame (`refam.segment_video`); J&F per clip, averaged.",
        "",
        markdown_table(m.video),
        "",
        "## Word maps on the test split (raw head-mean attention, Otsu threshold)",
        "",
        markdown_table(m.maps[~m.maps.model.str.contains(r"\[") & m.maps.subset.isin(subsets)]),
        "",
        "## Generation",
        "",
        markdown_table(pd.DataFrame([m.generation])),
        "",
        "## Sinks while drawing (test captions, 8 steps)",
        "",
        markdown_table(m.sinks),
        "",
        "## Training",
        "",
        f"- config: `{json.dumps(log['model_config'])}`",
        f"- recipe: `{json.dumps(log['train_config'])}`",
        f"- {log['steps']} steps, {log['images_seen']} images, {log['wall_seconds'] / 3600:.1f} h in all",
        f"- curriculum gate readings (step, shape read back): {log.get('gates') or 'none'}; "
        f"gate passed at step {log.get('gate_step')}",
        "",
        "Runs:",
        "",
        markdown_table(runs) if len(runs) else "(one run)",
        "",
        "Loss (mean per window of steps):",
        "",
        markdown_table(curve.reset_index().rename(columns={"step": "from step"})),
        "",
    ]  # fmt: skip
    for recipe, frame in (curves or {}).items():
        lines += [f"### Learning curve: {recipe} (val)", "", markdown_table(frame), ""]
    (folder / "card.md").write_text("\n".join(lines))
    figures = {k: v for k, v in m.claims.items() if k != "subset"}
    claimed = {"subset": m.claims["subset"], "tolerance": _TOLERANCE, "figures": figures}
    (folder / "claims.json").write_text(json.dumps(claimed, indent=1) + "\n")
    (folder / "bars.json").write_text(met.to_json(orient="records", indent=1))
    (folder / "refam.json").write_text(json.dumps(m.options, indent=1) + "\n")
    return folder / "card.md"
