"""The store writer's options (layouts, codecs, storage dtypes), streamed variables and the
up-front check of the disk's free space."""

from __future__ import annotations

import errno
import tracemalloc

import numpy as np
import pytest
import xarray as xr

import attnlens
from attnlens.errors import LayoutError, StoreError, StoreFullError
from attnlens.store import StoreWriter, open_store, verify_store
from attnlens.testing import flux_inputs, tiny_flux_transformer


@pytest.fixture(scope="module")
def captured():
    """Three samples of every variable but ``full``, captured in memory."""
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
    keep = ("cross", "text_to_image", "key_mass", "hidden_norm")
    with attnlens.capture(model, keep=keep) as cap:
        for seed in range(3):
            cap.next_sample()
            model(**flux_inputs(model, seed=seed, timestep=1.0))
            model(**flux_inputs(model, seed=seed, timestep=0.5))
    return cap.result


def _write(location, ds, **options):
    writer = StoreWriter(location, **options)
    writer.submit([f"s{i}" for i in range(ds.sizes["sample"])], lambda: ds)
    writer.close()
    return open_store(location)


@pytest.mark.parametrize(
    ("layout", "compression"), [("chunks", None), ("shards", None), ("chunks", "zstd"), ("shards", "lz4")]
)
def test_every_layout_and_codec_reads_back_what_was_captured(captured, tmp_path, layout, compression):
    ds = _write(tmp_path / "run.zarr", captured, layout=layout, compression=compression)
    xr.testing.assert_identical(ds.drop_vars("sample_id").load(), captured)
    assert verify_store(tmp_path / "run.zarr") == []


def test_layouts_chunk_as_documented(captured, tmp_path):
    import zarr

    _write(tmp_path / "a.zarr", captured, layout="chunks")
    _write(tmp_path / "b.zarr", captured, layout="shards")
    cross = captured.cross
    whole = (1, *cross.shape[1:])
    assert zarr.open_array(tmp_path / "a.zarr" / "cross").chunks == whole  # small: a sample per chunk
    sharded = zarr.open_array(tmp_path / "b.zarr" / "cross")
    assert sharded.shards == whole and sharded.chunks == (1, 1, 1, *cross.shape[3:])  # a step and layer


@pytest.mark.parametrize(
    ("storage", "read_as", "relative"), [("float16", "float16", 2**-11), ("bfloat16", "float32", 2**-8)]
)
def test_storage_dtypes_keep_the_stated_precision(captured, tmp_path, storage, read_as, relative):
    ds = _write(tmp_path / "run.zarr", captured, storage_dtype=storage).load()
    for name in ("cross", "text_to_image", "key_mass"):
        got, want = ds[name].values.astype(np.float64), captured[name].values.astype(np.float64)
        assert ds[name].dtype == read_as
        # rounding to nearest: half a unit in the last place; float16 also flushes below 2**-14 to
        # multiples of 2**-24, an absolute error of at most 2**-25
        bound = relative * np.abs(want) + (2**-25 if storage == "float16" else 0)
        assert np.all(np.abs(got - want) <= bound), name
        assert not np.array_equal(got, want)  # the test can fail: it did round
    xr.testing.assert_identical(
        ds.hidden_norm.drop_vars("sample_id"), captured.hidden_norm
    )  # keeps its dtype
    sizes = attnlens.store.stored_bytes(tmp_path / "run.zarr")
    assert sizes["cross"] == captured.cross.nbytes // 2


def test_bad_options_name_the_choices(tmp_path):
    with pytest.raises(StoreError, match="unknown layout 'tiles': choose from auto, chunks, shards"):
        StoreWriter(tmp_path / "a.zarr", layout="tiles")
    with pytest.raises(StoreError, match="unknown storage dtype 'int8'"):
        StoreWriter(tmp_path / "a.zarr", storage_dtype="int8")
    with pytest.raises(StoreError, match="unknown compression 'gzip'"):
        StoreWriter(tmp_path / "a.zarr", compression="gzip")


# -- streaming one variable region by region --------------------------------------------------


@pytest.fixture(scope="module")
def with_full():
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
    with attnlens.capture(model, keep=("full", "cross")) as cap:
        for seed in range(2):
            cap.next_sample()
            model(**flux_inputs(model, seed=seed, timestep=1.0))
            model(**flux_inputs(model, seed=seed, timestep=0.5))
    return cap.result


def _stream_full(writer, ds, row, sample_id, rows=5):
    full = ds.full.isel(sample=row)
    stream = writer.stream(sample_id, "full", dict(full.sizes), dtype=full.dtype)
    for step in range(full.sizes["step"]):
        for layer in range(full.sizes["layer"]):
            for q in range(0, full.sizes["query_all"], rows):  # query chunks, as the capture computes them
                block = full.values[step, layer, :, q : q + rows]
                stream.write(block, step=step, layer=layer, query_all=slice(q, q + rows))
    return stream


@pytest.mark.parametrize("location", ["local", "memory"])
def test_a_streamed_variable_with_the_rest_of_its_sample(with_full, tmp_path, location):
    url = str(tmp_path / "run.zarr") if location == "local" else "memory://attnlens-tests/stream/run.zarr"
    writer = StoreWriter(url)
    names = []
    for row in range(2):
        stream = _stream_full(writer, with_full, row, None)  # a growing store numbers it
        names.append(stream.sample_id)
        rest = with_full.isel(sample=[row]).drop_vars("full")
        writer.submit(None, lambda rest=rest: rest)
    writer.close()
    assert names == ["0", "1"]
    ds = open_store(url).load()
    xr.testing.assert_identical(ds.drop_vars("sample_id"), with_full)
    assert verify_store(url) == []


def test_an_incomplete_stream_leaves_its_sample_unwritten(with_full, tmp_path):
    path = tmp_path / "run.zarr"
    writer = StoreWriter(path, sample_ids=["a", "b"])
    full = with_full.full.isel(sample=0)
    stream = writer.stream("a", "full", dict(full.sizes), dtype=full.dtype)
    stream.write(full.values[0, 0], step=0, layer=0)  # one step and layer of two by two
    writer.submit(["a"], lambda: with_full.isel(sample=[0]).drop_vars("full"))
    with pytest.raises(LayoutError, match=r"'full' of sample 'a' was streamed incompletely: \d+ element"):
        writer.close()
    assert writer.pending() == ["a", "b"]
    assert not list(path.glob("full/c.0.*"))  # its chunks were removed


def test_stream_regions_are_checked(with_full, tmp_path):
    writer = StoreWriter(tmp_path / "run.zarr")
    full = with_full.full.isel(sample=0)
    stream = writer.stream("a", "full", dict(full.sizes), dtype=full.dtype)
    with pytest.raises(LayoutError, match="not a range within"):
        stream.write(full.values[0, 0], step=5, layer=0)
    with pytest.raises(LayoutError, match=r"do not fill the region"):
        stream.write(full.values[0], step=0, layer=0)
    with pytest.raises(LayoutError, match=r"has dims \['step', 'layer', 'head', 'query_all', 'key'\]"):
        stream.write(full.values[0, 0], frame=0)
    with pytest.raises(LayoutError, match="stream a variable of the schema"):
        writer.stream("b", "full", {"query": 3})
    writer.close()


def test_streaming_holds_a_few_chunks_never_the_whole_matrix(tmp_path):
    sizes = {"step": 8, "layer": 8, "head": 2, "query_all": 512, "key": 512}  # 128 MiB in float32
    writer = StoreWriter(tmp_path / "run.zarr", queue_size=1)
    stream = writer.stream("a", "full", sizes)
    assert stream.chunks == {"step": 1, "layer": 1, "head": 2, "query_all": 512, "key": 512}  # 2 MiB
    chunk, total = 2 * 512 * 512 * 4, 8 * 8 * 2 * 512 * 512 * 4
    tracemalloc.start()
    try:
        for step in range(8):
            for layer in range(8):
                block = np.full((2, 512, 512), step * 10 + layer, dtype=np.float32)
                stream.write(block, step=step, layer=layer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * chunk < total / 10, (peak, chunk)
    key_mass = np.zeros((1, 8, 8, 2, 512), dtype=np.float32)
    writer.submit(
        ["a"], lambda: xr.Dataset({"key_mass": (("sample", "step", "layer", "head", "key"), key_mass)})
    )
    writer.close()
    full = open_store(tmp_path / "run.zarr").full.isel(sample=0)
    assert float(full.isel(step=7, layer=6, head=1, query_all=511, key=0)) == 76.0


# -- the disk's free space, checked before anything is written ---------------------------------


def test_a_stream_that_would_not_fit_the_disk_is_refused_up_front(tmp_path, monkeypatch):
    import attnlens.store.writer as writer_module

    monkeypatch.setattr(writer_module, "free_bytes", lambda store: 10 * 2**20)
    writer = StoreWriter(tmp_path / "run.zarr")
    sizes = {"step": 28, "layer": 57, "head": 24, "query_all": 4608, "key": 4608}  # FLUX.1-dev at 1024²
    with pytest.raises(
        StoreFullError, match=r"keeping 'full' of one sample needs 1\.5 TiB .* 10\.0 MiB free"
    ) as info:
        writer.stream("a", "full", sizes, dtype=np.float16)
    assert info.value.errno == errno.ENOSPC
    writer.close()
    assert not any((tmp_path / "run.zarr").rglob("*"))  # nothing was written
    with pytest.raises(StoreFullError, match=r"this capture needs 2\.0 GiB"):
        writer.check_space(2 * 2**30)
    writer.check_space(2**20)  # fits


def test_a_failed_write_stops_the_next_stream_instead_of_leaving_it_waiting(with_full, tmp_path):
    def broken():
        raise LayoutError("this sample group is broken")

    writer = StoreWriter(tmp_path / "run.zarr")
    writer.submit(["a"], broken)
    full = with_full.full.isel(sample=0)
    with pytest.raises(LayoutError, match="this sample group is broken"):
        writer.stream("b", "full", dict(full.sizes), dtype=full.dtype)
    writer.close(raise_errors=False)


def test_a_growing_store_grows_past_its_first_capacity(tmp_path):
    dims = ("sample", "step", "layer", "head", "key")
    groups = [np.full((30, 1, 1, 1, 4), float(g), dtype=np.float32) for g in range(3)]
    writer = StoreWriter(tmp_path / "run.zarr")
    for values in groups:  # 90 samples: the arrays start with room for 64
        writer.submit(None, lambda values=values: xr.Dataset({"key_mass": (dims, values)}))
    writer.close()
    ds = open_store(tmp_path / "run.zarr")
    assert list(ds.sample_id.values) == [str(i) for i in range(90)]
    np.testing.assert_array_equal(ds.key_mass.values, np.concatenate(groups))
    assert ds.encoding["sample_slots"] == 90


def test_a_growing_stream_sets_the_step_count_of_a_fresh_store(tmp_path):
    path = tmp_path / "run.zarr"
    sizes = {"step": 1, "layer": 1, "head": 1, "query_all": 4, "key": 4}
    key_mass = np.zeros((1, 3, 1, 1, 4), dtype=np.float32)
    rest = xr.Dataset({"key_mass": (("sample", "step", "layer", "head", "key"), key_mass)})
    writer = StoreWriter(path)
    stream = writer.stream("a", "full", sizes, growing="step")
    assert not stream.fixed
    for step in range(3):
        stream.grow(step + 1)  # a step arrives
        stream.write(np.full((4, 4), float(step), "f4"), step=step, layer=0, head=0)
    writer.submit(["a"], lambda: rest)
    writer.close()
    assert open_store(path).full.shape == (1, 3, 1, 1, 4, 4)
    writer = StoreWriter(path)
    later = writer.stream("b", "full", sizes, growing="step")  # takes the store's step count
    assert later.fixed and later.sizes["step"] == 3
    with pytest.raises(
        LayoutError, match=r"over 3 step\(s\) per sample, but sample 'b' goes on to 4 step\(s\)"
    ):
        later.grow(4)
    later.discard()
    writer.close()
    ds = open_store(path)
    assert list(ds.sample_id.values) == ["a"]
    np.testing.assert_array_equal(ds.full.values[0, :, 0, 0, 0, 0], [0.0, 1.0, 2.0])
    assert verify_store(path) == []
    with pytest.raises(LayoutError, match="has no dim 'frame' to grow"):
        StoreWriter(path).stream("c", "full", sizes, growing="frame")
