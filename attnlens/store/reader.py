"""The lazy reader: a store as an ``xarray.Dataset`` of dask arrays, and checks of what it holds.

Opening reads the root metadata, the arrays' metadata and the consolidated sample records,
never a chunk. Every chunk is read through :class:`_CheckedStore`, which compares it with what
its sample's record says was written: a chunk that is missing, truncated or altered raises
:class:`~attnlens.errors.CorruptStoreError` naming the sample, instead of reading as zarr's fill
value.
"""

from __future__ import annotations

import asyncio
import copy
import math
import threading
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from ..errors import CorruptStoreError, StoreError, choices
from . import layout as lay
from .location import (
    MARK,
    StoreLike,
    get_bytes,
    metadata_problems,
    open_arrays,
    read_root,
    resolve,
    run_all,
)
from .records import Records, crc32c, load_records, read_record
from .writer import _digest, _slot_keys, _strings

__all__ = ["open_store", "stored_bytes", "verify_store"]

_DASK_CHUNK = 64 * 2**20  # target size of one dask task's read


class _CheckedStore(WrapperStore):
    """Reads chunks only as their writer recorded them: present, with their size and crc32c."""

    def __init__(self, store: Store, url: str, records: Records, mark: dict[str, Any]) -> None:
        super().__init__(store)
        self.url = url
        self.records = records
        self.layout_chunks: dict[str, list[int]] = mark.get("layout_chunks", {})
        self.per_sample = {n for n, e in mark.get("arrays", {}).items() if e["role"] != "layout"}
        self._chunks: dict[int, dict[str, list[int]]] = {}  # each read sample's record, by slot
        self._lock = threading.Lock()

    def _with_store(self, store: Store) -> _CheckedStore:
        """The same checks over another view of the store (zarr's read-only copy of a writable one)."""
        checked = copy.copy(self)
        checked._store = store
        return checked

    async def get(
        self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        array, _, rest = key.rpartition("/")
        if not rest.startswith("c."):
            return buf  # metadata
        if array in self.per_sample:
            slot = int(rest[2:].split(".", 1)[0])
            what = f"chunk {key} of sample {self._id(slot)!r}"
            expected = (await self._sample_chunks(slot)).get(key)
        else:
            what, expected = f"chunk {key} of {array!r}", self.layout_chunks.get(key)
        if buf is None:
            raise CorruptStoreError(f"{self.url}: {what} is missing (deleted after it was written)")
        if expected is None:
            raise CorruptStoreError(
                f"{self.url}: {what} was not recorded by its writer; the store is damaged"
            )
        if byte_range is None:  # a shard's inner chunks, read by range, carry their own crc32c
            data = buf.as_numpy_array()
            if data.size != expected[0]:
                raise CorruptStoreError(
                    f"{self.url}: {what} holds {data.size} bytes, its writer wrote {expected[0]}: it is "
                    "truncated or damaged. Capture the sample again or restore the store from a copy"
                )
            if crc32c(data) != expected[1]:
                raise CorruptStoreError(
                    f"{self.url}: {what} differs from what its writer wrote (crc32c): it is damaged. "
                    "Capture the sample again or restore the store from a copy"
                )
        return buf

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    def _id(self, slot: int) -> str:
        pos = self.records.find(slot)
        return self.records.ids[pos] if pos is not None else str(slot)

    async def _sample_chunks(self, slot: int) -> dict[str, list[int]]:
        with self._lock:
            found = self._chunks.get(slot)
        if found is None:
            pos = self.records.find(slot)
            if pos is None:
                raise CorruptStoreError(f"{self.url}: slot {slot} holds no complete sample")
            found = (await read_record(self._store, self.records.names[pos], self.url))["chunks"]
            with self._lock:
                self._chunks[slot] = found
        return found


class _ChunkReader:
    """Array-like over the complete samples of a zarr array, for ``dask.array.from_array``."""

    def __init__(self, array: zarr.Array, url: str, slots: np.ndarray, ids: np.ndarray) -> None:
        self.array = array
        self.url = url
        self.slots = slots
        self.ids = ids
        self.shape = (len(slots), *array.shape[1:])
        self.ndim = array.ndim
        self.storage = array.attrs.get(lay.STORAGE_ATTR)
        self.strings = array.dtype.kind in "TU" or str(array.dtype).startswith("String")
        self.dtype = (
            np.dtype(object) if self.strings else np.dtype(np.float32) if self.storage else array.dtype
        )

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        slots, ids = self.slots[first], np.atleast_1d(self.ids[first])
        if np.ndim(slots) == 0:
            first = int(slots)
        elif len(slots) == 0:  # nothing to read: an empty result of the right shape
            return np.broadcast_to(np.empty((), self.dtype), self.shape)[key].copy()
        elif slots[-1] - slots[0] == len(slots) - 1 and np.all(np.diff(slots) == 1):
            first = slice(int(slots[0]), int(slots[-1]) + 1)  # contiguous slots: one range
        else:
            first = slots
        try:
            out = np.asarray(self.array.oindex[(first, *rest)])
        except CorruptStoreError:
            raise
        except OSError as exc:
            raise StoreError(f"cannot read {self.array.path!r} from {self.url}: {exc}") from exc
        except Exception as exc:  # the codecs raise ValueError/RuntimeError on bad bytes
            names = choices([repr(str(i)) for i in ids], 4)
            raise CorruptStoreError(
                f"{self.url}: a chunk of {self.array.path!r} for sample(s) {names} cannot be decoded "
                f"({type(exc).__name__}: {exc}); the file is truncated or corrupt. Capture the sample again "
                "(`with cap.sample(id):` overwrites it) or restore the store from a copy"
            ) from exc
        out = lay.decode(out, self.storage)
        return out.astype(object) if self.strings else out


def _lazy(reader: _ChunkReader, data: bool) -> Any:
    """A dask array over the complete samples of ``reader``'s array."""
    import dask.array as da

    array = reader.array
    block = list(array.metadata.chunk_grid.chunk_shape)  # shards of a sharded array
    if array.shards is not None:
        block = list(array.chunks)  # a task may read one inner chunk
    itemsize = 16 if reader.strings else array.dtype.itemsize
    if data:
        # one sample per task, so that a damaged sample spoils no read of the others; whole
        # storage blocks along the leading dims, up to the target size
        for axis in range(1, len(block)):
            if block[axis] < array.shape[axis]:
                per = max(1, _DASK_CHUNK // (math.prod(block) * itemsize))
                block[axis] = min(array.shape[axis], block[axis] * per)
                break
    else:  # a few bytes per sample: many samples per task
        block[0] = max(1, _DASK_CHUNK // (math.prod(block) * itemsize))
    return da.from_array(
        reader,
        chunks=tuple(min(b, max(1, s)) for b, s in zip(block, reader.shape, strict=True)),
        name=f"attnlens-{array.path}-{uuid.uuid4().hex}",
        asarray=False,
        lock=False,
        fancy=True,  # dask fuses a selection into the read only for fancy getters: one sample reads one
        meta=np.empty((0,) * array.ndim, dtype=reader.dtype),
    )


def _open(location: StoreLike, storage_options: dict[str, Any] | None) -> tuple[Store, str, dict[str, Any]]:
    store, url = resolve(location, storage_options, read_only=True)
    attrs = read_root(store, url, for_writing=False)
    assert attrs is not None
    if _digest(attrs.get("capture", {})) != attrs[MARK].get("capture_digest"):
        raise CorruptStoreError(
            f"{url}: the root attributes (zarr.json) differ from what the writer recorded: they were edited "
            "or damaged"
        )
    return store, url, attrs


def open_store(location: StoreLike, *, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """Open an attnlens store as a lazy ``xarray.Dataset``: reads metadata only.

    The Dataset has the variables, coordinates and attributes of :mod:`attnlens.schema` (what
    ``cap.result`` holds in memory), plus ``sample_id`` along ``sample``. Data variables and
    per-sample token coordinates are dask arrays; ``sample`` holds the store slot of each
    complete sample, so it has gaps while samples are missing. Samples cut short by a crash
    are left out.

    Args:
        location: a local path, an fsspec URL (``file://``, ``memory://``, ``s3://``, ...) or a
            zarr v3 ``Store``.
        storage_options: passed to fsspec for URLs.

    Returns:
        e.g. ``cross`` ``(sample, step, layer, head, query, key_text)`` as dask arrays.

    Raises:
        StoreNotFoundError: nothing at ``location``.
        NotAStoreError: an empty folder, or a store another tool wrote.
        StoreVersionError: a store written by a newer (or a much older) attnlens.
        CorruptStoreError: a missing array or edited metadata; a chunk that is missing or
            damaged raises it when read, naming its sample.

    >>> open_store("memory://nowhere.zarr")
    Traceback (most recent call last):
    ...
    attnlens.errors.StoreNotFoundError: no attnlens store at memory://nowhere.zarr: nothing exists there
    """
    store, url, attrs = _open(location, storage_options)
    mark = attrs[MARK]
    records = load_records(store, url)
    arrays = open_arrays(_CheckedStore(store, url, records, mark), url, mark)
    slots = records.slots
    ids = np.array(records.ids, dtype=object)
    data_vars: dict[str, Any] = {}
    coords: dict[str, Any] = {}
    for name, arr in sorted(arrays.items()):
        role = mark["arrays"][name]["role"]
        dims = tuple(arr.metadata.dimension_names or ())
        if role == "layout":
            coords[name] = (dims, _strings(np.asarray(arr[...])))
        else:
            lazy = _lazy(_ChunkReader(arr, url, slots, ids), data=role == "data")
            (data_vars if role == "data" else coords)[name] = (dims, lazy)
    coords["sample"] = slots
    coords["sample_id"] = ("sample", ids)
    out_attrs = {**attrs.get("capture", {}), "schema_version": mark["schema_version"]}
    out_attrs["prompts"] = records.prompts
    ds = xr.Dataset(data_vars, coords=coords, attrs=out_attrs)
    ds.encoding["source"] = url
    # complete or not; declared stores hold one slot per sample id
    ds.encoding["sample_slots"] = mark.get("slots") or records.extent
    ds.encoding["damaged"] = dict(records.damaged)  # slot: what is wrong
    ds.encoding["in_progress"] = sorted(records.leased)
    ds.encoding["stored_bytes"] = _stored(mark, records)  # what stored_bytes() says, without reading again
    return ds


def stored_bytes(location: StoreLike, *, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Bytes each array's chunks take on the storage, from the sample records (no listing of chunks).

    >>> import xarray as xr
    >>> from attnlens.store import StoreWriter
    >>> dims = ("sample", "step", "layer", "head", "key")
    >>> ds = xr.Dataset({"key_mass": (dims, np.full((1, 1, 1, 1, 4), 0.25, "f4"))})
    >>> writer = StoreWriter("memory://doc/bytes.zarr", layout="chunks")
    >>> writer.submit(None, lambda: ds)
    >>> writer.close()
    >>> stored_bytes("memory://doc/bytes.zarr")["key_mass"]  # 4 float32 values, uncompressed
    16
    """
    store, url, attrs = _open(location, storage_options)
    return _stored(attrs[MARK], load_records(store, url))


def _stored(mark: dict[str, Any], records: Records) -> dict[str, int]:
    """Bytes of each array's chunks: the coordinates written once, and every complete sample's."""
    out = dict.fromkeys(sorted(mark["arrays"]), 0)
    for key, (size, _) in mark.get("layout_chunks", {}).items():
        out[key.rsplit("/", 1)[0]] += size
    for name, sizes in records.nbytes.items():
        out[name] = out.get(name, 0) + int(sizes.sum())
    return out


def verify_store(location: StoreLike, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Check every chunk of every complete sample against its record; one message per problem found.

    Finds missing, truncated and altered chunks, missing arrays, edited metadata, damaged
    records and samples written twice at once; reads every chunk's bytes, decodes none.

    >>> import xarray as xr
    >>> from attnlens.store import StoreWriter
    >>> dims = ("sample", "step", "layer", "head", "key")
    >>> ds = xr.Dataset({"key_mass": (dims, np.full((2, 1, 1, 1, 4), 0.25, "f4"))})
    >>> writer = StoreWriter("memory://doc/verify.zarr")
    >>> writer.submit(None, lambda: ds)
    >>> writer.close()
    >>> verify_store("memory://doc/verify.zarr")
    []
    """
    store, url, attrs = _open(location, storage_options)
    mark = attrs[MARK]
    listed = mark["arrays"]
    found = dict(zip(listed, run_all(get_bytes(store, f"{n}/zarr.json") for n in listed), strict=True))
    problems = metadata_problems(listed, found, url)
    sound = [n for n in listed if found[n] is not None and not any(f"{n!r}" in p for p in problems)]
    arrays = {n: zarr.open_array(store, path=n, mode="r") for n in sound}
    records = load_records(store, url)
    if records.index_damaged:
        problems.append(
            "the index (_attnlens/index.json) is damaged: it is ignored, and rewritten by the next writer"
        )
    problems += [f"sample {where!r}: {msg}" for where, msg in records.damaged.items()]
    problems += sync(
        _check_chunks(store, url, {k: tuple(v) for k, v in mark.get("layout_chunks", {}).items()}, "layout")
    )
    for slot, name, sample_id in zip(records.slots.tolist(), records.names, records.ids, strict=True):
        try:
            body = sync(read_record(store, name, url))
        except CorruptStoreError as exc:
            problems.append(f"sample {sample_id!r}: {str(exc).removeprefix(f'{url}: ')}")
            continue
        chunks = {k: tuple(v) for k, v in body["chunks"].items()}
        for name, arr in arrays.items():
            if listed[name]["role"] != "layout":
                unrecorded = [k for k in _slot_keys(arr, slot) if k not in chunks]
                if unrecorded:
                    problems.append(
                        f"{name}, sample {sample_id!r}: chunk(s) {choices(unrecorded, 4)} were never recorded"
                    )
        problems += sync(_check_chunks(store, url, chunks, f"sample {sample_id!r}"))
    return problems


async def _check_chunks(store: Store, url: str, chunks: dict[str, tuple[int, int]], owner: str) -> list[str]:
    async def one(key: str, size: int, crc: int) -> str | None:
        data = await get_bytes(store, key)
        array = key.rsplit("/", 1)[0]
        if data is None:
            return f"{array}, {owner}: chunk {key} is missing"
        if len(data) != size:
            return (
                f"{array}, {owner}: chunk {key} holds {len(data)} bytes, its writer wrote {size} (truncated)"
            )
        if crc32c(data) != crc:
            return f"{array}, {owner}: chunk {key} differs from what its writer wrote (crc32c)"
        return None

    found = await asyncio.gather(*(one(k, *v) for k, v in chunks.items()))
    return [f for f in found if f is not None]
