"""Attention stores: round trips, resumable and concurrent writes, bad stores, a full disk, the accessor."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from fsspec import register_implementation
from fsspec.implementations.memory import MemoryFileSystem

import attnlens
from attnlens.cli import main as cli_main
from attnlens.errors import (
    CorruptStoreError,
    LayoutError,
    NotAStoreError,
    SelectionError,
    StoreError,
    StoreFullError,
    StoreNotFoundError,
    StoreVersionError,
)
from attnlens.store import StoreWriter, open_store, stored_bytes, verify_store
from attnlens.testing import flux_inputs, tiny_flux_transformer, tiny_t5_tokenizer

# Run by the fault tests in fresh processes, and exec'd here so that both sides capture alike.
WRITER = r"""
import os, signal, sys

import torch

import attnlens
from attnlens.store import StoreWriter
from attnlens.testing import flux_inputs, tiny_flux_transformer


def run(store, ids, todo, kill_at=None):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in every process, whatever its thread count
    try:
        return _run(store, ids, todo, kill_at)
    finally:
        torch.set_num_threads(threads)


def _run(store, ids, todo, kill_at):
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
    if kill_at:
        original = StoreWriter._commit

        async def crash(self, pos, sample_id, prompt):  # every chunk of the sample written, its record not
            if sample_id == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            await original(self, pos, sample_id, prompt)

        StoreWriter._commit = crash
    with attnlens.capture(model, keep=("cross", "key_mass"), store=store, sample_ids=ids) as cap:
        for sid in cap.pending(todo):
            with cap.sample(sid):
                model(**flux_inputs(model, height=4, width=4, seed=int(sid[1:])))
    return cap


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(","), sys.argv[4])
"""
IDS = [f"s{i}" for i in range(6)]


def _writer_module() -> dict:
    namespace: dict = {"__name__": "attnlens_test_writer"}
    exec(WRITER, namespace)
    return namespace


def _spawn(path, todo, kill_at=""):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), ",".join(IDS), ",".join(todo), kill_at],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The store an uninterrupted single process writes, and the capture that wrote it."""
    path = tmp_path_factory.mktemp("reference") / "run.zarr"
    cap = _writer_module()["run"](str(path), IDS, IDS)
    return path, cap


def _record(path, slot):
    """The record file of a sample slot: the commit point of the sample."""
    (found,) = (path / "_attnlens" / "samples" / str(slot // 1024)).glob(f"{slot}.*.json")
    return found


def _memory_url(name: str = "run") -> str:
    return f"memory://attnlens-tests/{uuid.uuid4().hex}/{name}.zarr"


def _capture(model, store, n=3, **kwargs):
    keep = kwargs.pop("keep", ("cross", "key_mass"))
    with attnlens.capture(model, keep=keep, store=store, **kwargs) as cap:
        for seed in range(n):
            cap.next_sample()
            model(**flux_inputs(model, height=4, width=6, seed=seed))
    return cap


# -- round trips ------------------------------------------------------------------------------


def test_round_trip_equals_the_in_memory_result(flux_pipe, tmp_path):
    def run(store):
        with attnlens.capture(flux_pipe, keep=keep, store=store) as cap:
            for prompt in ("a red mug on the table", "the cat"):
                flux_pipe(
                    prompt,
                    height=16,
                    width=16,
                    num_inference_steps=2,
                    max_sequence_length=16,
                    generator=torch.Generator().manual_seed(0),
                    output_type="np",
                )
        return cap.result

    path = tmp_path / "run.zarr"
    keep = ("cross", "text_to_image", "key_mass", "hidden_norm")
    stored = run(path)  # a store-backed capture's result is the store, read back
    ds = open_store(path)
    assert all(ds[v].chunks is not None for v in keep)  # dask-backed, nothing read yet
    assert list(ds.sample_id.values) == ["0", "1"]
    xr.testing.assert_identical(stored, ds)
    xr.testing.assert_identical(ds.drop_vars("sample_id").load(), run(None))
    assert ds.attrs["prompts"] == ["a red mug on the table", "the cat"]


@pytest.mark.parametrize(("dtype", "stored"), [(torch.float16, "float16"), (torch.bfloat16, "float32")])
def test_half_precision_is_stored_as_captured(flux, dtype, stored):
    url = _memory_url()
    _capture(flux, url, n=2, dtype=dtype)
    ds = open_store(url)
    assert str(ds.cross.dtype) == stored  # numpy has no bfloat16: captures hold it as float32
    xr.testing.assert_identical(
        ds.drop_vars("sample_id").load(), _capture(flux, None, n=2, dtype=dtype).result
    )


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_fsspec_urls(flux, tmp_path, scheme):
    url = f"file://{tmp_path}/nested/run.zarr" if scheme == "file" else _memory_url()
    _capture(flux, url, n=2)
    xr.testing.assert_identical(
        open_store(url).drop_vars("sample_id").load(), _capture(flux, None, n=2).result
    )
    assert stored_bytes(url)["cross"] > 0


def test_samples_stream_to_the_store_before_the_capture_ends(flux, tmp_path):
    path = tmp_path / "run.zarr"
    with attnlens.capture(flux, keep="cross", store=path) as cap:
        for seed in range(3):
            with cap.sample(f"img{seed}"):
                flux(**flux_inputs(flux, seed=seed))
        cap._writer.close()  # let the writer thread catch up, as it does when the model is slower
        assert list(open_store(path).sample_id.values) == ["img0", "img1", "img2"]
        with cap.sample("img3"):
            flux(**flux_inputs(flux, seed=3))
    assert open_store(path).sizes["sample"] == 4


def test_an_exception_leaves_the_unfinished_sample_out(flux, tmp_path):
    def first_sample():
        flux(**flux_inputs(flux, timestep=1.0))
        flux(**flux_inputs(flux, timestep=0.5))

    path = tmp_path / "run.zarr"
    with pytest.raises(KeyboardInterrupt), attnlens.capture(flux, keep="cross", store=path):
        first_sample()
        flux(**flux_inputs(flux, timestep=1.0, seed=1))  # a new sample starts: the first is finished
        raise KeyboardInterrupt
    with attnlens.capture(flux, keep="cross") as cap:
        first_sample()
    ds = open_store(path)
    assert ds.sizes["sample"] == 1
    xr.testing.assert_identical(ds.drop_vars("sample_id").load(), cap.result)


def test_growing_store_appends_and_named_samples_are_overwritten(flux, tmp_path):
    def second(store):
        with attnlens.capture(flux, keep=("cross", "key_mass"), store=store) as cap:
            for name, seed in (("1", 7), ("extra", 8)):  # overwrite slot 1 with another input, then append
                with cap.sample(name) if store is not None else contextlib.nullcontext():
                    cap.next_sample()
                    flux(**flux_inputs(flux, height=4, width=6, seed=seed))
        return cap.result

    path = tmp_path / "run.zarr"
    first = _capture(flux, path, n=2).result.load()
    second(path)
    ds = open_store(path).load()
    assert list(ds.sample_id.values) == ["0", "1", "extra"]
    np.testing.assert_array_equal(ds.cross.isel(sample=0), first.cross.isel(sample=0))
    np.testing.assert_array_equal(ds.cross.isel(sample=[1, 2]), second(None).cross)


# -- resuming and several writers -------------------------------------------------------------


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(reference, tmp_path):
    path = tmp_path / "run.zarr"
    child = _spawn(path, IDS, kill_at="s3")
    _, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err
    ds = open_store(path)
    assert list(ds.sample_id.values) == ["s0", "s1", "s2"]  # s3 was half-written and is not read
    assert list(path.glob("cross/c.3.*")) and ds.encoding["in_progress"] == [3]  # its chunks and lease remain
    cap = _writer_module()["run"](str(path), IDS, IDS)  # resume: skips s0..s2, rewrites s3
    assert cap.result.sizes["sample"] == 6  # the whole store, read back
    xr.testing.assert_identical(open_store(path).load(), open_store(reference[0]).load())


def test_two_writer_processes_give_the_same_store_as_one(reference, tmp_path):
    path = tmp_path / "run.zarr"
    children = [_spawn(path, IDS[rank::2]) for rank in range(2)]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    xr.testing.assert_identical(open_store(path).load(), open_store(reference[0]).load())


# Appends samples to a growing store once a "go" file appears, so that two processes append at once.
APPENDER = r"""
import os, sys, time

import numpy as np
import torch

import attnlens
from attnlens.testing import flux_inputs, tiny_flux_transformer

store, rank, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
while not os.path.exists(go):
    time.sleep(0.01)
with attnlens.capture(model, keep="cross", store=store) as cap:
    for i in range(n):
        if i % 3 == 2:  # some named, most numbered by the store
            with cap.sample(f"rank{rank}-{i}"):
                model(**flux_inputs(model, height=4, width=4, seed=100 * rank + i))
        else:
            cap.next_sample()
            model(**flux_inputs(model, height=4, width=4, seed=100 * rank + i))
with attnlens.capture(model, keep="cross") as ref:  # what this process wrote, captured in memory
    for i in range(n):
        ref.next_sample()
        model(**flux_inputs(model, height=4, width=4, seed=100 * rank + i))
np.save(f"{store}.{rank}.npy", ref.result.cross.values)
"""


def _each_exactly_once(store, expected):
    """Every expected sample is in the store exactly once, and the store holds nothing else."""
    ds = open_store(store).load()
    stored = list(ds.cross.values)
    assert len(stored) == len(expected) == len(set(ds.sample_id.values))
    for values in expected:
        matches = [i for i, got in enumerate(stored) if np.array_equal(got, values)]
        assert len(matches) == 1
        stored.pop(matches[0])
    return ds


def test_two_processes_appending_to_one_growing_store_at_once(tmp_path):
    path = str(tmp_path / "run.zarr")
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", APPENDER, path, str(rank), "40", str(go)], stderr=subprocess.PIPE
        )
        for rank in range(2)
    ]
    go.touch()
    for child in children:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err.decode()
    expected = [*np.load(f"{path}.0.npy"), *np.load(f"{path}.1.npy")]
    ds = _each_exactly_once(path, expected)
    named = sorted(i for i in ds.sample_id.values if i.startswith("rank"))
    assert named == sorted(
        f"rank{r}-{i}" for r in range(2) for i in range(2, 40, 3)
    )  # 80 samples: arrays grew
    assert verify_store(path) == []


def test_two_writers_appending_to_one_memory_store_at_once(flux):
    import threading

    url = _memory_url()
    flux_b = tiny_flux_transformer(num_layers=2, num_single_layers=2)
    results = {}

    def append(name, model, seed):
        with attnlens.capture(model, keep="cross", store=url) as cap:
            for i in range(6):
                cap.next_sample()
                model(**flux_inputs(model, seed=seed + i))
        with attnlens.capture(model, keep="cross") as ref:  # what this writer wrote, in memory
            for i in range(6):
                ref.next_sample()
                model(**flux_inputs(model, seed=seed + i))
        results[name] = ref.result.cross.values

    threads = [
        threading.Thread(target=append, args=("a", flux, 0)),
        threading.Thread(target=append, args=("b", flux_b, 50)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ds = _each_exactly_once(url, [*results["a"], *results["b"]])
    assert sorted(int(i) for i in ds.sample_id.values) == list(range(12))  # numbered without gaps or repeats


def _lease(path, slot, pid, host=None):
    import socket

    lease = path / "_attnlens" / "leases" / str(slot)
    lease.parent.mkdir(parents=True, exist_ok=True)
    host = host or socket.gethostname()
    lease.write_text(json.dumps({"writer": "other", "id": "s1", "host": host, "pid": pid, "since": 0}))
    return lease


def test_a_sample_being_written_by_another_process_is_refused_and_a_dead_writers_is_taken_over(
    reference, tmp_path
):
    import shutil

    path = tmp_path / "run.zarr"
    shutil.copytree(reference[0], path)
    before = open_store(path).load()
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)

    def rewrite_s1():
        capture = attnlens.capture(model, keep=("cross", "key_mass"), store=path, sample_ids=IDS)
        with capture as cap, cap.sample("s1"):
            model(**flux_inputs(model, height=4, width=4, seed=9))
        return cap.result

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease = _lease(path, 1, alive.pid)
        with pytest.raises(StoreError, match=r"sample 's1' .* is being written by another writer .*delete"):
            rewrite_s1()
        xr.testing.assert_identical(open_store(path).load(), before)  # nothing was lost or changed
        _lease(path, 1, alive.pid, host="elsewhere")
        with pytest.raises(StoreError, match="being written by another writer"):
            rewrite_s1()
    finally:
        alive.kill()
        alive.wait()
    _lease(path, 1, alive.pid)  # its process has ended: the lease is stale
    rewritten = rewrite_s1()
    assert not lease.exists()
    after = open_store(path).load()
    xr.testing.assert_identical(after.drop_sel(sample=1), before.drop_sel(sample=1))
    np.testing.assert_array_equal(after.cross.sel(sample=1), rewritten.cross.sel(sample=1))
    assert not np.array_equal(after.cross.sel(sample=1), before.cross.sel(sample=1))  # s1 is new
    assert verify_store(path) == []


def test_a_sample_without_its_record_is_rewritten_on_resume(reference, tmp_path):
    import shutil

    path = tmp_path / "run.zarr"
    shutil.copytree(reference[0], path)
    _record(path, 4).unlink()  # as if the writer died just before committing the sample
    assert "s4" not in open_store(path).sample_id.values
    writer = _writer_module()
    with attnlens.capture(tiny_flux_transformer(), keep="cross", store=path, sample_ids=IDS) as cap:
        assert cap.pending() == ["s4"]
        assert cap.pending(["s5", "s4"]) == ["s4"]
    cap = writer["run"](str(path), IDS, IDS)
    assert cap.result.sizes["sample"] == 6
    xr.testing.assert_identical(open_store(path).load(), open_store(reference[0]).load())


def test_declared_sample_ids_are_checked(flux, reference):
    path = reference[0]
    with pytest.raises(StoreError, match="every process must pass the same sample_ids"):
        attnlens.capture(flux, keep="cross", store=path, sample_ids=["a", "b"])
    with pytest.raises(StoreError, match="cannot take declared sample_ids"):
        attnlens.capture(flux, keep="cross", store=_growing_store(flux), sample_ids=["a"])
    cap = attnlens.capture(flux, keep="cross", store=_memory_url(), sample_ids=IDS)
    with pytest.raises(StoreError, match="not among the 6 sample_ids"), cap, cap.sample("nope"):
        pass
    with pytest.raises(StoreError, match=r"capture each sample inside `with cap.sample\(id\):`"), cap:
        flux(**flux_inputs(flux))
    with pytest.raises(TypeError, match="give store= as well"):
        attnlens.capture(flux, keep="cross", sample_ids=IDS)


def _growing_store(flux) -> str:
    url = _memory_url()
    _capture(flux, url, n=1)
    return url


def test_samples_of_another_layout_or_model_are_refused(flux, tmp_path):
    path = tmp_path / "run.zarr"
    _capture(flux, path, n=1)
    capture = attnlens.capture(flux, keep=("cross", "key_mass"), store=path)
    with pytest.raises(LayoutError, match="a store holds samples of one layout"), capture:
        flux(**flux_inputs(flux, height=6, width=6))
    with pytest.raises(
        LayoutError, match="holds \\['cross', 'key_mass'\\], this capture keeps \\['cross'\\]"
    ):
        _capture(flux, path, n=1, keep="cross")
    other = tiny_flux_transformer(num_layers=2, num_single_layers=2, guidance_embeds=True)
    with pytest.raises(LayoutError, match="written from a model with config_hash"):
        _capture(other, path, n=1)
    assert open_store(path).sizes["sample"] == 1


# -- stores that are not (readable) attnlens stores ---------------------------------------------


def test_foreign_stores_empty_folders_and_missing_paths(flux, tmp_path):
    foreign = tmp_path / "foreign.zarr"
    xr.Dataset({"temperature": ("x", np.arange(3.0))}).to_zarr(foreign, zarr_format=3, consolidated=False)
    with pytest.raises(NotAStoreError, match=r"written by another tool.*temperature"):
        open_store(foreign)
    with pytest.raises(NotAStoreError, match="written by another tool"):
        attnlens.capture(flux, keep="cross", store=foreign)  # and nothing is written into it
    v2 = zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    v2.create_array("a", shape=(2,), dtype="f4")
    with pytest.raises(NotAStoreError, match="zarr format 2"):
        open_store(tmp_path / "v2.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAStoreError, match="is an empty folder"):
        open_store(tmp_path / "empty")
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "notes.txt").write_text("hello")
    with pytest.raises(NotAStoreError, match=r"not a zarr store \(no zarr.json\).*notes.txt"):
        open_store(tmp_path / "files")
    assert issubclass(NotAStoreError, attnlens.AttnlensError)


def test_a_store_from_a_future_schema_version_is_refused(flux, tmp_path):
    path = tmp_path / "run.zarr"
    _capture(flux, path, n=1)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["attnlens"]["schema_version"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreVersionError, match=r"schema version 99 .*newer than this attnlens.*upgrade"):
        open_store(path)
    with pytest.raises(StoreVersionError, match="upgrade attnlens"):
        attnlens.capture(flux, keep="cross", store=path)


def test_damaged_root_metadata_is_reported(tmp_path):
    path = tmp_path / "run.zarr"
    path.mkdir()
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(CorruptStoreError, match=r"zarr\.json is not valid JSON"):
        open_store(path)


# -- a full disk ------------------------------------------------------------------------------


class _FullMemory(MemoryFileSystem):
    """An in-memory filesystem with a byte budget: writes past it fail with ENOSPC, as on a full disk."""

    protocol = "fullmem"
    budget = math.inf
    written = 0

    def pipe_file(self, path, value, *args, **kwargs):
        cls = type(self)
        if cls.written + len(value) > cls.budget:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        cls.written += len(value)
        return super().pipe_file(path, value, *args, **kwargs)


@pytest.fixture
def full_memory():
    register_implementation("fullmem", _FullMemory, clobber=True)
    yield _FullMemory
    _FullMemory.budget, _FullMemory.written = math.inf, 0


def _bytes_for(flux, full_memory, n: int) -> int:
    full_memory.written = 0
    _capture(flux, f"fullmem://{uuid.uuid4().hex}/run.zarr", n=n)
    return full_memory.written


def test_a_full_disk_ends_the_capture_and_keeps_completed_samples(flux, full_memory):
    two, three = _bytes_for(flux, full_memory, 2), _bytes_for(flux, full_memory, 3)
    url = f"fullmem://{uuid.uuid4().hex}/run.zarr"
    full_memory.written, full_memory.budget = 0, (two + three) // 2  # runs out within the third sample
    with pytest.raises(
        StoreFullError, match=r"no space left.*the 2 sample\(s\) completed before remain"
    ) as info:
        _capture(flux, url, n=5)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    reference = _capture(flux, None, n=2)
    ds = open_store(url)
    assert list(ds.sample_id.values) == ["0", "1"]
    xr.testing.assert_identical(ds.drop_vars("sample_id").load(), reference.result)
    root = url.removeprefix("fullmem:/")
    left = [key for key in full_memory.store if key.startswith(root) and "/c.2." in key]
    assert not left, "the unfinished sample's chunks are removed"


# -- the accessor -----------------------------------------------------------------------------


@pytest.fixture
def labelled(flux):
    tok = tiny_t5_tokenizer(model_max_length=8)
    labels = [
        attnlens.label_tokens(tok, tok(text, padding="max_length", max_length=8).input_ids)
        for text in ("the red cat", "a dog on grass")
    ]
    with attnlens.capture(flux, keep=("cross", "text_to_image", "key_mass"), labels=labels) as cap:
        flux(**flux_inputs(flux, height=3, width=5, text_len=8, batch=2))
    return cap.result


def test_map_of_a_word(labelled):
    ds = labelled
    cat = ds.attnlens.map(word="cat", sample=0)
    assert cat.dims == ("y", "x") and cat.shape == (3, 5)
    expected = ds.cross.isel(sample=0, key_text=2).mean(("step", "layer", "head")).values.reshape(3, 5)
    np.testing.assert_allclose(cat.values, expected, rtol=1e-6)
    one_layer = ds.attnlens.map(word="CAT", sample=0, layer="single.*", head=1, step=0)
    expected = ds.cross.isel(sample=0, key_text=2, step=0, head=1).sel(layer=["single.0", "single.1"])
    np.testing.assert_allclose(one_layer.values, expected.mean("layer").values.reshape(3, 5), rtol=1e-6)
    back = ds.attnlens.map(token=[2], sample=0, variable="text_to_image")
    np.testing.assert_allclose(
        back.values.ravel(),
        ds.text_to_image.isel(sample=0, query_text=2).mean(("step", "layer", "head")),
        rtol=1e-6,
    )
    dog = ds.attnlens.map(word="dog", sample=1)  # a word of one token
    np.testing.assert_allclose(dog.values, ds.attnlens.map(token="▁dog", sample=1).values)


def test_map_from_a_store_and_bad_selections(labelled, tmp_path):
    path = tmp_path / "run.zarr"
    writer = StoreWriter(path)
    writer.submit(["first", "second"], lambda: labelled)
    writer.close()
    ds = open_store(path)
    np.testing.assert_array_equal(
        ds.attnlens.map(word="cat", sample="first"), labelled.attnlens.map(word="cat", sample=0)
    )
    with pytest.raises(SelectionError, match="holds 2 samples: choose one with sample="):
        ds.attnlens.map(word="cat")
    with pytest.raises(SelectionError, match="'mug' is not in this sample's prompt; words: cat, red, the"):
        ds.attnlens.map(word="mug", sample=0)
    with pytest.raises(SelectionError, match=r"matches no layer here; layers: double\.0"):
        ds.attnlens.map(word="cat", sample=0, layer="triple.*")
    with pytest.raises(SelectionError, match="exactly one of word= or token="):
        ds.attnlens.map(sample=0)
    with pytest.raises(SelectionError, match="no 'full' in this Dataset"):
        ds.attnlens.map(word="cat", sample=0, variable="full")
    with pytest.raises(SelectionError, match="no sample with id 'third'"):
        ds.attnlens.map(word="cat", sample="third")


def test_tokens_and_select(labelled):
    table = labelled.attnlens.tokens()
    assert list(table.columns) == ["token_str", "word", "word_index", "token_kind"]
    assert table.loc[(1, 1)].word == "dog" and table.loc[(0, 1)].token_kind == "content"
    singles = labelled.attnlens.select(layer_kind="single")
    assert list(singles.layer.values) == ["single.0", "single.1"]
    content = labelled.attnlens.select(token_kind="content")
    # "the red cat" has content at 1, 2; "a dog on grass" at 1, 3: position 3 is NaN in sample 0
    assert list(content.key_text.values) == [1, 2, 3]
    assert np.isnan(content.cross.isel(sample=0, key_text=2)).all()
    assert not np.isnan(content.cross.isel(sample=1, key_text=2)).any()
    np.testing.assert_array_equal(
        content.cross.isel(sample=0, key_text=[0, 1]), labelled.cross.isel(sample=0, key_text=[1, 2])
    )
    assert content.sizes["key"] == 3  # joint positions too; image keys have kind "image"
    assert labelled.attnlens.select(token_kind=["image", "pad"]).sizes["key"] == 15 + 4
    with pytest.raises(SelectionError, match="no token of kind verb"):
        labelled.attnlens.select(token_kind="verb")
    with pytest.raises(SelectionError, match="kinds here: double, single"):
        labelled.attnlens.select(layer_kind="cross")


# -- the command line -------------------------------------------------------------------------


def test_cli_inspect(flux, tmp_path, capsys):
    path = tmp_path / "run.zarr"
    _capture(flux, path, n=2)
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for text in (
        "2 complete of 2 slot(s)",
        "cross",
        "key_mass",
        "double.0",
        "single.0",
        "timestep",
        "grid of 1 × 4 × 6",
    ):
        assert text in out, text
    assert cli_main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_store_errors_name_the_problem_for_writes_too(tmp_path):
    with pytest.raises(StoreError, match="non-empty list of distinct"):
        StoreWriter(tmp_path / "a.zarr", sample_ids=["x", "x"])
    assert os.listdir(tmp_path) == []  # nothing created on a bad call


def test_sample_blocks_are_checked(flux, tmp_path):
    path = tmp_path / "run.zarr"
    with attnlens.capture(flux, keep="cross", store=path) as cap:
        mismatch = r"names 1 sample\(s\), but its forwards formed 2"
        with pytest.raises(LayoutError, match=mismatch), cap.sample("pair"):
            flux(**flux_inputs(flux, batch=2))
        with pytest.raises(attnlens.AttnlensError, match="nothing was captured inside"), cap.sample("empty"):
            pass
        with pytest.raises(attnlens.AttnlensError, match="cannot nest"), cap.sample("a"), cap.sample("b"):
            pass
        with pytest.raises(StoreError, match="give the ids to check"):
            cap.pending()
    assert not (path / "zarr.json").exists()  # nothing valid was captured, so nothing was written
    with pytest.raises(StoreError, match="writes no store"):
        attnlens.capture(flux, keep="cross").pending(["a"])


def test_a_store_whose_samples_are_all_unfinished_opens_empty(flux, tmp_path):
    path = tmp_path / "run.zarr"
    with attnlens.capture(flux, keep="cross", store=path, sample_ids=["a", "b"]) as cap, cap.sample("b"):
        flux(**flux_inputs(flux))
    _record(path, 1).unlink()
    ds = open_store(path)
    assert ds.sizes["sample"] == 0 and ds.cross.shape[1:] == (1, 4, 2, 16, 8)
    assert ds.load().token_str.shape == (0, 8)
