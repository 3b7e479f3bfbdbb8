"""Score RefAM on a referring-segmentation benchmark: the code behind ``attnlens eval``.

:func:`evaluate` segments every sample of a :class:`~attnlens.datasets.ReferringDataset` with each
variant (RefAM, and with ``ablate`` its ablations and the attention-only baselines), and writes to
``out``:

- ``parts/rank-R.jsonl``: one line per (sample, variant), appended and flushed as it is scored, so
  that a run killed at any point resumes where it stopped (a torn last line is dropped);
- ``samples.parquet``: every (sample, variant) once, in dataset order then variant order;
- ``summary.json`` and ``summary.md``: the paper's table: mIoU, oIoU, P@0.5 … P@0.9 for images
  (× 100 in the Markdown), J&F, J and F for videos (DAVIS definitions), one row per variant;
- ``run.json``: what ran (dataset, split, model, options, variants); a folder holding another
  run is refused rather than mixed.

Under ``torchrun`` or ``accelerate launch`` (``RANK`` / ``WORLD_SIZE`` set) rank ``r`` of ``w``
takes samples ``r, r + w, r + 2w, …``; ranks meet at a barrier (gloo, or the process group the
launcher set up), and rank 0 merges the parts: the result does not depend on the world size or
on which rank scored a sample.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from ..analysis.metrics import j_and_f, referring_summary
from ..datasets import ReferringDataset
from ..errors import DatasetError
from .benchmark import VARIANTS
from .errors import RefamError
from .image import segment
from .video import segment_video

__all__ = ["ABLATIONS", "evaluate", "summarise"]

#: ``--ablate``: the paper's ablation rows (each step of RefAM switched off) and attention-only baselines
ABLATIONS: dict[str, dict[str, Any]] = {
    "RefAM": {},
    "no stop-word filtering": VARIANTS["no magnet filtering"],
    "no GAS handling": VARIANTS["no GAS handling"],
    "no appended magnets": VARIANTS["no appended magnets"],
    "no SAM refinement": VARIANTS["no refinement"],
    "attention only": VARIANTS["attention only"],
    "attention only, head noun": VARIANTS["attention only, head noun"],
}


def _world() -> tuple[int, int]:
    """``(rank, world size)`` of a torchrun / accelerate launch, ``(0, 1)`` otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world: int) -> None:
    if world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")  # the launcher's MASTER_ADDR / MASTER_PORT
    dist.barrier()


def evaluate(
    dataset: ReferringDataset,
    model: Any,
    out: str | Path,
    *,
    segmenter: Any = None,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    model_name: str | None = None,
    progress: bool = True,
    **options: Any,
) -> pd.DataFrame | None:
    """Score every sample with every variant; resumable, sharded by rank.

    Args:
        dataset: a split from :func:`attnlens.datasets.load` (its masks must be public).
        model: what :func:`~attnlens.refam.segment` (images) or ``segment_video`` (videos) takes.
        out: the results folder (created; an interrupted run there resumes).
        segmenter: a SAM / SAM 2 ``(model, processor)`` pair, or ``None`` (the threshold refiner).
        variants: name → :class:`~attnlens.refam.RefamOptions` overrides (default RefAM alone;
            :data:`ABLATIONS` for the paper's ablation table).
        model_name: how ``run.json`` names the model (default its class name).
        **options: RefAM options shared by every variant.

    Returns:
        on rank 0, the summary (one row per variant); ``None`` on the other ranks.

    Raises:
        RefamError: ``out`` holds a run of another dataset, model, options or variants.
        DatasetError: a video sample without masks (a split scored by a challenge server).
    """
    variants = dict(variants or {"RefAM": {}})
    rank, world = _world()
    out = Path(out)
    run = {
        "dataset": dataset.name,
        "split": dataset.split,
        "samples": len(dataset),
        "model": model_name or (model if isinstance(model, str) else type(model).__name__),
        "options": {k: repr(v) for k, v in sorted(options.items())},
        "variants": {k: {o: repr(v) for o, v in sorted(dict(ov).items())} for k, ov in variants.items()},
        "segmenter": None if segmenter is None else type(segmenter[0]).__name__,
    }
    _claim(out, run, rank, world)
    ids = dataset.ids()
    done = {(row["id"], row["variant"]) for row in _read_parts(out)}
    mine = [i for i in range(rank, len(ids), world) if any((ids[i], v) not in done for v in variants)]
    journal = out / "parts" / f"rank-{rank}.jsonl"
    with open(journal, "a", encoding="utf-8") as f:
        bar = tqdm(mine, desc=f"{dataset.name} {dataset.split}" + (f" [rank {rank}]" if world > 1 else ""),
                   disable=not progress, position=rank, unit="sample")  # fmt: skip
        for i in bar:
            sample = dataset[i]
            for name, overrides in variants.items():
                if (ids[i], name) in done:
                    continue
                row = {"index": i, "id": ids[i], "variant": name, "expression": sample.expression}
                row.update(_score(sample, model, segmenter, {**options, **overrides}))
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())  # a kill loses at most the line being written
    _barrier(world)
    if rank != 0:
        return None
    rows = _merge(out, ids, list(variants))
    summary = summarise(rows, dataset.kind)
    _write_summary(out, summary, dataset)
    return summary


def _score(sample: Any, model: Any, segmenter: Any, options: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    if hasattr(sample, "frames"):
        if sample.masks is None:
            raise DatasetError(
                f"{sample.id} has no public masks: this split is scored by its challenge server"
            )
        r = segment_video(sample.frames, sample.expression, model=model, segmenter=segmenter, **options)
        scores: dict[str, Any] = j_and_f(r.masks, sample.masks)
        refiner = r.info["refiner"][0]
    else:
        r = segment(sample.image, sample.expression, model=model, segmenter=segmenter, **options)
        inter, union = int((r.mask & sample.mask).sum()), int((r.mask | sample.mask).sum())
        scores = {"intersection": inter, "union": union, "iou": inter / union if union else 1.0}
        refiner = r.info["refiner"]
    seconds = time.perf_counter() - start
    return {**scores, "gas_applied": r.info["gas_applied"], "refiner": refiner, "seconds": seconds}


def _claim(out: Path, run: dict[str, Any], rank: int, world: int) -> None:
    """Write ``run.json`` (rank 0), or check that the folder's run is this one."""
    path = out / "run.json"
    if rank == 0:
        (out / "parts").mkdir(parents=True, exist_ok=True)
        if path.exists():
            held = json.loads(path.read_text())
            if held != run:
                changed = sorted(k for k in run if held.get(k) != run[k])
                raise RefamError(
                    f"{out} holds another evaluation (its {', '.join(changed)} differ): give a new --out, "
                    "or delete the folder to start over"
                )
        else:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(run, indent=2))
            tmp.replace(path)
    _barrier(world)
    if rank and json.loads(path.read_text()) != run:
        raise RefamError(f"rank {rank} was started with another evaluation than {path} holds")


def _read_parts(out: Path) -> list[dict[str, Any]]:
    """Every complete line of every rank's journal (whatever world size wrote it)."""
    rows = []
    for part in sorted((out / "parts").glob("rank-*.jsonl")):
        data = part.read_bytes()
        good = data[: data.rfind(b"\n") + 1]  # a line cut by a kill has no newline yet
        if len(good) != len(data):
            part.write_bytes(good)
        rows += [json.loads(line) for line in good.decode("utf-8").splitlines() if line.strip()]
    return rows


def _merge(out: Path, ids: list[str], variants: list[str]) -> pd.DataFrame:
    """One row per (sample, variant), in dataset then variant order, written to ``samples.parquet``."""
    rows = pd.DataFrame(_read_parts(out)).drop_duplicates(["id", "variant"], keep="first")
    order = {v: k for k, v in enumerate(variants)}
    rows = rows[rows.variant.isin(order) & rows.id.isin(set(ids))]
    missing = len(ids) * len(variants) - len(rows)
    if missing:
        raise RefamError(f"{out}: {missing} (sample, variant) results are missing after every rank finished")
    rows = rows.assign(_v=rows.variant.map(order)).sort_values(["index", "_v"]).drop(columns="_v")
    rows = rows.reset_index(drop=True)
    tmp = out / "samples.parquet.tmp"
    rows.to_parquet(tmp, index=False)
    tmp.replace(out / "samples.parquet")
    return rows


def summarise(rows: pd.DataFrame, kind: str = "image") -> pd.DataFrame:
    """The paper's table of per-sample rows: one row per variant, in the rows' variant order.

    Images: ``n``, ``mIoU``, ``oIoU``, ``P@0.5`` … ``P@0.9``
    (:func:`~attnlens.analysis.metrics.referring_summary`);
    videos: ``n``, ``J&F``, ``J``, ``F`` (means over expressions); all in ``[0, 1]``.
    """
    out = []
    for variant, g in rows.groupby("variant", sort=False):
        if kind == "image":
            scores = referring_summary(g.intersection.to_numpy(), g.union.to_numpy())
        else:
            scores = {"n": len(g), "J&F": g["J&F"].mean(), "J": g["J"].mean(), "F": g["F"].mean()}
        out.append({"variant": variant, **scores})
    return pd.DataFrame(out)


def _write_summary(out: Path, summary: pd.DataFrame, dataset: ReferringDataset) -> None:
    from ..report import markdown_table

    records = summary.to_dict("records")
    (out / "summary.json").write_text(
        json.dumps({"dataset": dataset.name, "split": dataset.split, "rows": records}, indent=2)
    )
    shown = summary.copy()
    for column in shown.columns:
        if column not in ("variant", "n"):
            shown[column] = [f"{100 * v:.2f}" for v in shown[column]]
    title = f"{dataset.name} {dataset.split} (× 100)"
    (out / "summary.md").write_text(
        f"# {title}\n\n{markdown_table(shown.rename(columns={'variant': 'method'}))}\n"
    )
