"""``attnlens eval``: the paper's table, resumable after a kill, the same under torchrun as alone.

Models are tiny random ones (saved to folders, loaded as a user's would be), so the numbers are
low and only their bookkeeping is checked: every sample scored once, metrics consistent with the
per-sample rows, nothing depending on the world size or on an interruption.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attnlens.datasets import load
from attnlens.errors import DatasetError
from attnlens.refam import RefamError
from attnlens.refam.evaluation import ABLATIONS, evaluate
from attnlens.testing import (
    labelme_benchmarks,
    labelme_examples,
    tiny_flux_pipeline,
    tiny_shapes_config,
    tiny_shapes_pipeline,
)
from attnlens.zoo import ShapesPipeline

pytest.importorskip("pyarrow", reason="per-sample results are parquet (the eval extra)")
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"
)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "shapes"
    tiny_shapes_pipeline().save(folder)
    return folder


def cli(*args: str, launcher: tuple[str, ...] = (), **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [*launcher] if launcher else [sys.executable]
    return subprocess.Popen([*command, "-m", "attnlens.cli", "eval", *args], cwd=REPO, env=env, **popen)


def shapes_args(model: Path, out: Path, limit: int) -> tuple[str, ...]:
    return (
        "--dataset",
        "shapesref",
        "--split",
        "test",
        "--model",
        str(model),
        "--limit",
        str(limit),
        "--out",
        str(out),
    )


def results(out: Path) -> tuple[dict, pd.DataFrame]:
    rows = pd.read_parquet(out / "samples.parquet").drop(columns="seconds")
    return json.loads((out / "summary.json").read_text()), rows


@pytest.mark.slow
def test_torchrun_with_two_ranks_gives_the_summary_of_one_process(shapes_folder, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    alone = cli(*shapes_args(shapes_folder, tmp_path / "alone", 8), stderr=subprocess.DEVNULL)
    launcher = (str(torchrun), "--nproc-per-node", "2")
    two = cli(*shapes_args(shapes_folder, tmp_path / "two", 8), launcher=launcher, stderr=subprocess.DEVNULL,
              stdout=subprocess.DEVNULL)  # fmt: skip
    assert alone.wait(timeout=600) == 0 and two.wait(timeout=600) == 0
    (s1, r1), (s2, r2) = results(tmp_path / "alone"), results(tmp_path / "two")
    assert s1 == s2
    pd.testing.assert_frame_equal(r1, r2)
    assert sorted(p.name for p in (tmp_path / "two" / "parts").iterdir()) == ["rank-0.jsonl", "rank-1.jsonl"]
    assert r1["index"].tolist() == list(range(8))


@pytest.mark.slow
def test_an_eval_killed_mid_run_resumes_with_no_sample_missing_or_twice(shapes_folder, tmp_path):
    out, n = tmp_path / "killed", 30  # samples enough that the kill lands mid-run, however fast each is
    run = cli(*shapes_args(shapes_folder, out, n), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    journal = out / "parts" / "rank-0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not journal.exists() or journal.read_text().count("\n") < 3):
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    scored = journal.read_text().count("\n")
    assert 3 <= scored < n, "the run was killed after it had scored some samples and before it ended"
    with open(journal, "a") as f:
        f.write('{"index": 99, "id": "torn')  # a line the kill cut short
    assert cli(*shapes_args(shapes_folder, out, n), stderr=subprocess.DEVNULL).wait(timeout=600) == 0
    _, rows = results(out)
    assert rows["id"].tolist() == [f"shapesref/test/{i}" for i in range(n)]  # each once, in order
    reference = tmp_path / "whole"
    assert cli(*shapes_args(shapes_folder, reference, n), stderr=subprocess.DEVNULL).wait(timeout=600) == 0
    pd.testing.assert_frame_equal(rows, results(reference)[1])


def test_ablate_gives_the_papers_ablation_rows_and_consistent_metrics(tmp_path):
    ds = load("shapesref", "test", limit=3)
    summary = evaluate(ds, tiny_shapes_pipeline(), tmp_path, variants=ABLATIONS, progress=False)
    assert summary["variant"].tolist() == list(ABLATIONS)
    assert list(summary.columns) == [
        "variant",
        "n",
        "mIoU",
        "oIoU",
        "P@0.5",
        "P@0.6",
        "P@0.7",
        "P@0.8",
        "P@0.9",
    ]
    rows = pd.read_parquet(tmp_path / "samples.parquet")
    assert len(rows) == 3 * len(ABLATIONS)
    for variant, g in rows.groupby("variant"):
        one = summary.set_index("variant").loc[variant]
        assert one["mIoU"] == pytest.approx((g.intersection / g.union).mean())
        assert one["oIoU"] == pytest.approx(g.intersection.sum() / g.union.sum())
    raw = rows[rows.variant == "attention only"]
    assert set(raw.gas_applied) == {"none"} and set(raw.refiner) == {"threshold only"}
    markdown = (tmp_path / "summary.md").read_text()
    assert "| method | n | mIoU | oIoU | P@0.5" in markdown and "no SAM refinement" in markdown


def test_a_folder_holding_another_run_is_refused(tmp_path):
    evaluate(load("shapesref", "test", limit=2), tiny_shapes_pipeline(), tmp_path, progress=False)
    with pytest.raises(RefamError, match=r"holds another evaluation .*samples"):
        evaluate(load("shapesref", "test", limit=3), tiny_shapes_pipeline(), tmp_path, progress=False)
    again = evaluate(load("shapesref", "test", limit=2), tiny_shapes_pipeline(), tmp_path, progress=False)
    assert again["n"].tolist() == [2]  # the same run: nothing left to do, the same table


def test_a_split_without_public_masks_cannot_be_scored(tmp_path):
    from PIL import Image

    (tmp_path / "valid" / "JPEGImages" / "v").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "valid" / "JPEGImages" / "v" / "0.jpg")
    (tmp_path / "meta_expressions" / "valid").mkdir(parents=True)
    meta = {"videos": {"v": {"expressions": {"0": {"exp": "a cat", "obj_id": "1"}}, "frames": ["0"]}}}
    (tmp_path / "meta_expressions" / "valid" / "meta_expressions.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="no public masks"):
        evaluate(
            load("ref-youtube-vos", "valid", tmp_path),
            tiny_shapes_pipeline(),
            tmp_path / "out",
            progress=False,
        )


@pytest.fixture(scope="module")
def labelme(tmp_path_factory):
    try:
        examples = labelme_examples()
    except RuntimeError as err:
        pytest.skip(f"Debian's labelme-examples could not be fetched: {err}")
    return labelme_benchmarks(tmp_path_factory.mktemp("labelme"), examples)


def test_eval_on_real_photographs_in_refcoco_format(labelme, tmp_path):
    ds = load("refcoco", "val", labelme["refcoco"])
    summary = evaluate(ds, tiny_flux_pipeline(), tmp_path, progress=False, resolution=64)
    rows = pd.read_parquet(tmp_path / "samples.parquet")
    assert len(rows) == 9 and summary["n"].tolist() == [9]
    assert rows.iou.tolist() == pytest.approx((rows.intersection / rows.union).tolist())
    assert 0 <= summary["mIoU"][0] <= 1 and summary["P@0.5"][0] >= summary["P@0.9"][0]


def test_eval_on_a_real_video_in_ref_davis17_format(labelme, tmp_path):
    ds = load("ref-davis17", "val", labelme["ref-davis17"], expressions=["annot1_full_video"])
    summary = evaluate(ds, tiny_shapes_pipeline(), tmp_path, progress=False)
    rows = pd.read_parquet(tmp_path / "samples.parquet")
    assert len(rows) == 2 and list(summary.columns) == ["variant", "n", "J&F", "J", "F"]
    assert summary["J&F"][0] == pytest.approx((rows.J + rows.F).mean() / 2)


def test_an_embedded_model_is_scored_on_the_shapesref_world_it_draws(tmp_path):
    from attnlens.cli import main

    model, out = tmp_path / "v2", tmp_path / "out"
    ShapesPipeline.untrained(tiny_shapes_config("v2")).save(model)
    args = ["eval", "--dataset", "shapesref", "--split", "test", "--limit", "2", "--out", str(out)]
    assert main([*args, "--model", str(model)]) == 0
    rows = pd.read_parquet(out / "samples.parquet")
    assert rows["id"].tolist() == ["shapesref-v2/test/0", "shapesref-v2/test/1"]
