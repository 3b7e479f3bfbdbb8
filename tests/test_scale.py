"""Past one machine: `attnlens capture` by rank under torchrun, resumed after a kill; dask analyses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import attnlens
from attnlens.batch import Prompt, capture_prompts, read_prompts
from attnlens.cli import main
from attnlens.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    {"id": f"s{i}", "prompt": text, "seed": 10 + i}
    for i, text in enumerate(
        [
            "a red circle on the left",
            "a blue circle and a green square",
            "the circle below a yellow triangle",
            "a small circle on the right of the square",
            "a green circle",
            "the circle in the middle",
        ]
    )
]
CAPTURE = ["--model", "shapes-flux", "--steps", "2", "--keep", "cross", "key_mass", "--heads", "mean"]


def _env() -> dict[str, str]:
    # one thread per process, as torchrun gives each rank: the same arithmetic in every run
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120, **kwargs)


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "0",
        *args,
    ]


def _by_id(ds: xr.Dataset) -> dict[str, xr.Dataset]:
    return {str(sid): ds.isel(sample=i).drop_vars("sample") for i, sid in enumerate(ds.sample_id.values)}


def _assert_same_samples(got: xr.Dataset, want: xr.Dataset) -> None:
    """Every variable and coordinate of every sample, matched by sample id, bit for bit."""
    a, b = _by_id(got), _by_id(want)
    assert sorted(a) == sorted(b)
    assert list(got.data_vars) == list(want.data_vars)
    for sid in b:
        xr.testing.assert_identical(a[sid].reset_coords(), b[sid].reset_coords())


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def single(prompts_file, tmp_path_factory) -> Path:
    """The store one process writes."""
    store = tmp_path_factory.mktemp("single") / "run.zarr"
    done = _run(
        [sys.executable, "-m", "attnlens.cli", "capture", str(prompts_file), "--store", str(store), *CAPTURE]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 sample(s) captured, 0 already in the store, 0 failed, of 6" in done.stdout
    assert "per sample:" in done.stdout  # the plan comes first
    return store


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_store_one_process_writes(prompts_file, single, tmp_path):
    store = tmp_path / "ranks.zarr"
    done = _run(
        _torchrun("-m", "attnlens.cli", "capture", str(prompts_file), "--store", str(store), *CAPTURE)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):  # every world-size-th sample each
        assert (
            f"rank {rank} of 2: 3 sample(s) captured, 0 already in the store, 0 failed, of 3" in done.stdout
        )
    assert done.stdout.count("per sample:") == 1  # the plan, from rank 0 only
    got = attnlens.open_store(store)
    assert got.sizes["sample"] == 6
    _assert_same_samples(got, attnlens.open_store(single))
    assert attnlens.store.verify_store(store) == []


KILLER = """
import os, signal, sys, time
import attnlens
from attnlens.batch import call_pipeline, capture_prompts, read_prompts, world
from attnlens.zoo import load

place = world()
seen = []

def call(pipe, prompt):
    seen.append(prompt.id)
    call_pipeline(pipe, prompt, steps=2)
    if place.rank == 1 and len(seen) == 2:  # rank 1 dies in the middle of its second sample,
        for _ in range(400):  # once the background writer has stored its first
            try:
                if "s1" in attnlens.open_store(sys.argv[2]).sample_id.values:
                    break
            except attnlens.AttnlensError:
                pass
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

capture_prompts(load("shapes-flux"), read_prompts(sys.argv[1]), sys.argv[2], steps=2, call=call,
                keep=("cross", "key_mass"), heads="mean", progress=False)
"""


@pytest.mark.slow
def test_a_killed_rank_is_resumed_with_no_sample_missing_or_twice(prompts_file, single, tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(KILLER))
    store = tmp_path / "killed.zarr"
    killed = _run(_torchrun(str(script), str(prompts_file), str(store)))
    assert killed.returncode != 0  # torchrun reports the rank that died
    partial = attnlens.open_store(store)
    before = [str(s) for s in partial.sample_id.values]
    assert 1 <= len(before) < 6 and "s3" not in before  # s3: rank 1's second sample, cut short
    done = _run(
        [sys.executable, "-m", "attnlens.cli", "capture", str(prompts_file), "--store", str(store), *CAPTURE]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        f"{6 - len(before)} sample(s) captured, {len(before)} already in the store, 0 failed" in done.stdout
    )
    got = attnlens.open_store(store)
    ids = [str(s) for s in got.sample_id.values]
    assert sorted(ids) == sorted(p["id"] for p in PROMPTS) and len(set(ids)) == len(ids) == 6
    assert got.encoding["in_progress"] == [] and attnlens.store.verify_store(store) == []
    _assert_same_samples(got, attnlens.open_store(single))


def _task_sizes():
    """A scheduler plugin recording the largest result any task of the cluster held, in bytes."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class TaskSizes(SchedulerPlugin):
        name = "attnlens-task-sizes"

        def __init__(self) -> None:
            self.largest = 0
            self.scheduler = None

        async def start(self, scheduler) -> None:
            self.scheduler = scheduler

        def transition(self, key, start, finish, *args, **kwargs) -> None:
            task = self.scheduler.tasks.get(key) if finish == "memory" else None
            if task is not None and task.nbytes is not None:
                self.largest = max(self.largest, int(task.nbytes))

    return TaskSizes()


def _analyses(ds: xr.Dataset) -> dict[str, object]:
    from attnlens import analysis

    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True
    sinks = analysis.find_sinks(ds, min_ratio=2.0)
    return {
        "sinks": sinks.compute(),
        "by_layer": analysis.sinks_by_layer(sinks, ds),
        "magnets": analysis.find_magnets(ds).compute(),
        "redistribution": analysis.redistribution(ds, ds, "circle", mask=mask).compute(),
        "rank": analysis.rank(analysis.localisation_scores(ds, mask, "circle")),
    }


@pytest.mark.slow
def test_analyses_on_a_local_cluster_equal_the_in_process_ones(single):
    from distributed import Client

    ds = attnlens.open_store(single)
    variable = max(ds[v].nbytes for v in ds.data_vars)  # cross: 6 samples of 72 KiB, one chunk each
    import dask

    with dask.config.set(scheduler="synchronous"):
        want = _analyses(ds)
    # thread workers (processes=False): process workers would start slower than the analyses run here;
    # the CLI's --workers starts processes (the store's graph pickles: tested by test_cli_sinks_on_workers)
    limit = variable // 2  # the largest task is a (sample, key, group) one-hot of token labels, 173 KiB
    with attnlens.cluster(workers=2, processes=False, memory_limit=limit) as client:
        assert isinstance(client, Client) and len(client.nthreads()) == 2
        sizes = _task_sizes()
        client.register_plugin(sizes)

        def largest() -> int:
            return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[sizes.name].largest)

        got = _analyses(ds)
        streamed = largest()
        _ = ds.cross.values  # a whole variable at once is what the analyses must never ask for: seen here
        whole = largest()
    for name in ("sinks", "magnets", "redistribution"):
        xr.testing.assert_identical(got[name], want[name])
    for name in ("by_layer", "rank"):
        assert got[name].equals(want[name]), name
    assert 0 < streamed < limit < variable  # chunks streamed: no task held a variable's worth
    assert whole >= ds.cross.nbytes


@pytest.mark.slow
def test_cli_sinks_on_process_workers_prints_what_the_in_process_run_prints(single, capsys):
    assert main(["sinks", str(single), "--out", ""]) == 0
    local = capsys.readouterr().out
    cluster = _run(
        [sys.executable, "-m", "attnlens.cli", "sinks", str(single), "--out", "", "--workers", "2"]
    )
    assert cluster.returncode == 0, cluster.stderr[-3000:]  # the store's graph pickled to the workers
    assert cluster.stdout.startswith("computing on tcp://") and "(2 worker(s))" in cluster.stdout
    assert cluster.stdout.split("\n", 1)[1] == local


# -- bad input: one line, nothing written ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("", ".txt", "holds no prompts"),
        ("\n  \n", ".jsonl", "holds no prompts"),
        ('{"prompt": "a cat"}\n{"prompt": "a dog",\n', ".jsonl", "line 2: not valid JSON"),
        ('{"prompt": "a cat"}\n\n["a dog"]\n', ".jsonl", "line 3: expected a JSON object"),
        ('{"prompt": "a cat", "seed": -1}\n', ".jsonl", 'line 1: "seed" must be a non-negative integer'),
        (
            '{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n',
            ".jsonl",
            "line 2: id 'x' is given twice",
        ),
    ],
)
def test_bad_prompts_are_one_line_errors_and_write_nothing(tmp_path, capsys, text, suffix, message):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_prompts(path)
    store = tmp_path / "never.zarr"
    assert main(["capture", str(path), "--store", str(store), "--steps", "2"]) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith("error:") and message in out and "\n" not in out
    assert not store.exists()


def test_text_prompts_take_their_position_as_id_and_seed(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\n  a blue square  \n")
    assert read_prompts(path) == [Prompt("0", "a red circle", 0), Prompt("1", "a blue square", 1)]


def test_an_unreachable_scheduler_is_a_one_line_error(single, tmp_path, capsys):
    out = tmp_path / "sinks.html"
    code = main(
        [
            "sinks",
            str(single),
            "--scheduler",
            "tcp://127.0.0.1:9",
            "--connect-timeout",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 2
    text = capsys.readouterr().out.strip()
    assert text.startswith("error: no dask scheduler reachable at tcp://127.0.0.1:9") and "\n" not in text
    assert not out.exists()
    with pytest.raises(InputError, match="not both"), attnlens.cluster("tcp://127.0.0.1:9", workers=2):
        pass


def test_a_failed_sample_is_reported_and_the_others_are_written(tmp_path):
    from attnlens.batch import call_pipeline
    from attnlens.zoo import ShapesPipeline
    from attnlens.zoo.shapes import ShapesConfig

    pipe = ShapesPipeline.untrained(ShapesConfig(vocab_size=48, num_layers=1, num_single_layers=1))
    prompts = [Prompt("a", "a red circle", 0), Prompt("b", "a blue circle", 1), Prompt("c", "a circle", 2)]

    def call(p, prompt):
        call_pipeline(p, prompt, steps=2)
        if prompt.id == "b":
            raise RuntimeError("out of memory in step 2")

    store = tmp_path / "run.zarr"
    summary = capture_prompts(pipe, prompts, store, steps=2, call=call, keep="key_mass", progress=False)
    assert summary.captured == ["a", "c"] and not summary.ok
    assert summary.failures == {"b": "RuntimeError: out of memory in step 2"}
    assert "failed: sample 'b': RuntimeError: out of memory in step 2" in str(summary)
    assert summary.bytes > 0
    assert sorted(str(s) for s in attnlens.open_store(store).sample_id.values) == ["a", "c"]
    again = capture_prompts(pipe, prompts, store, steps=2, keep="key_mass", progress=False)  # resumes: b only
    assert again.captured == ["b"] and again.skipped == ["a", "c"] and again.ok
