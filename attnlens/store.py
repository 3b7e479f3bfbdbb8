"""Attention stores: a capture run as a zarr v3 group, read back lazily as an ``xarray.Dataset``.

A store holds the variables, coordinates and attributes of :mod:`attnlens.schema` along a
``sample`` dimension that grows as samples finish. ``attnlens.capture(model, store=...)``
streams each finished sample to it through a :class:`StoreWriter` (a background thread
behind a bounded queue); :func:`open_store` returns a Dataset whose variables are dask
arrays, so that opening reads metadata only and analyses run out of core.

>>> import attnlens
>>> from attnlens.testing import tiny_flux_transformer, flux_inputs
>>> model = tiny_flux_transformer()
>>> with attnlens.capture(model, keep="cross", heads="mean", store="memory://doc/run.zarr") as cap:
...     for seed in range(3):
...         with cap.sample(f"img{seed}"):
...             _ = model(**flux_inputs(model, height=4, width=6, seed=seed))
>>> ds = attnlens.open_store("memory://doc/run.zarr")
>>> ds.cross.dims, ds.sizes["sample"], list(ds.sample_id.values)
(('sample', 'step', 'layer', 'head', 'query', 'key_text'), 3, ['img0', 'img1', 'img2'])
>>> bool((ds.cross == cap.result.cross).all())
True

Layout of a store (one zarr v3 group):

- one array per data variable, chunked by ``(1 sample, 1 step, 1 layer, ...)`` (split further
  along heads and queries when a chunk would exceed 8 MiB) and, where chunks would be tiny,
  packed into shards that never span two samples; zstd compression with checksums;
- one array per coordinate: along ``step``/``layer``/... written once, along ``sample``
  (token strings, words, kinds) one chunk per sample; strings are variable-length UTF-8;
- ``sample_id``, ``prompt`` and ``sample_complete`` along ``sample``; a sample's completion flag
  is written after all of its chunks, so a sample cut short by a crash is never read;
- root attributes ``attnlens`` (schema version, sample-id mode) and ``capture`` (model,
  config hash, spec, versions).

Sample ids: without ``sample_ids`` a store grows, one slot per finished sample (ids
``"0"``, ``"1"``, ... unless named with :meth:`attnlens.Capture.sample`), and takes one writer
at a time. With ``sample_ids=[...]`` (the same list in every process) the store holds one slot
per declared id from the start, and any number of processes may fill disjoint slots at once,
e.g. under ``torchrun``::

    ids = [f"img{i}" for i in range(len(dataset))]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with attnlens.capture(pipe, spec, store="s3://bucket/run.zarr", sample_ids=ids) as cap:
        for sid in cap.pending(ids[rank::world]):  # skips samples completed by an earlier run
            with cap.sample(sid):
                pipe(prompts[sid], ...)

Every slot's chunks, shards and flag are separate objects, so processes never write to the
same object, except while the first samples create the arrays and root metadata: there every
process writes identical content.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .errors import (
    CorruptStoreError,
    LayoutError,
    NotAStoreError,
    StoreError,
    StoreFullError,
    StoreNotFoundError,
    StoreVersionError,
    choices,
)
from .schema import SCHEMA_VERSION

__all__ = ["StoreWriter", "open_store", "stored_bytes", "verify_store"]

StoreLike = str | os.PathLike | Store

#: Compressions a :class:`StoreWriter` offers.
COMPRESSIONS = ("zstd", "lz4", None)

_MARK = "attnlens"  # root attribute that makes a zarr group an attnlens store
_ROLE = "attnlens_role"  # array attribute: data | layout | per_sample | meta
_META = ("sample_id", "prompt", "sample_complete")

_CHUNK_MAX = 8 * 2**20  # larger chunks are split, so that reading one head stays cheap
# chunks are packed into shards up to this size: fewer, larger objects write faster (and fsync
# far faster) than one object per chunk, and a shard is written whole, once, with its sample
_SHARD_MAX = 128 * 2**20
_DASK_CHUNK = 64 * 2**20  # target size of one dask task's read


# -- opening a location ---------------------------------------------------------------------


def _resolve(
    location: StoreLike, storage_options: dict[str, Any] | None, *, read_only: bool
) -> tuple[Store, str]:
    """A zarr store for a local path, an fsspec URL or a zarr store object, and its name."""
    if isinstance(location, Store):
        return location, str(location)
    text = os.fspath(location)
    if "://" in text:
        from zarr.storage import FsspecStore

        options = dict(storage_options or {})
        if text.startswith("file://"):
            options.setdefault("auto_mkdir", True)  # fsspec's local files do not create parents
        return FsspecStore.from_url(text, storage_options=options, read_only=read_only), text
    from zarr.storage import LocalStore

    if read_only and not os.path.exists(text):
        raise StoreNotFoundError(f"no attnlens store at {text}: the path does not exist")
    return LocalStore(text, read_only=read_only), text


def _location_exists(store: Store, url: str) -> bool:
    fs, path = getattr(store, "fs", None), getattr(store, "path", None)
    if fs is not None and path is not None:
        return bool(sync(fs._exists(path)))
    root = getattr(store, "root", None)
    return root is None or os.path.exists(root)


def _top_keys(store: Store) -> list[str]:
    async def collect() -> list[str]:
        return [key async for key in store.list_dir("")]

    try:
        return sorted(sync(collect()))
    except FileNotFoundError:
        return []


def _get_json(store: Store, key: str, url: str) -> dict[str, Any] | None:
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    if buf is None:
        return None
    try:
        return json.loads(buf.to_bytes())
    except ValueError as exc:
        raise CorruptStoreError(
            f"{url}: {key} is not valid JSON ({exc}); the store's metadata is damaged"
        ) from exc


def _half_initialised(store: Store, names: Iterable[str], url: str) -> bool:
    """Whether the children are arrays an attnlens writer created (its first sample never finished)."""
    found = False
    for name in names:
        meta = _get_json(store, f"{name.rstrip('/')}/zarr.json", url)
        if meta is None or meta.get("node_type") != "array":
            continue
        if _ROLE not in meta.get("attributes", {}):
            return False
        found = True
    return found


def _root(store: Store, url: str, *, for_writing: bool) -> dict[str, Any] | None:
    """The root attributes of an attnlens store; ``None`` where a writer may start a new one.

    Raises the store errors that name what the location holds instead.
    """
    meta = _get_json(store, "zarr.json", url)
    keys = _top_keys(store) if meta is None or _MARK not in meta.get("attributes", {}) else []
    children = [k for k in keys if k != "zarr.json"]
    if meta is None:
        if not keys:
            if for_writing:
                return None
            if not _location_exists(store, url):
                raise StoreNotFoundError(f"no attnlens store at {url}: nothing exists there")
            raise NotAStoreError(
                f"{url} is an empty folder, not an attnlens store: capture into it with "
                "attnlens.capture(..., store=...) first"
            )
        if ".zgroup" in keys or ".zarray" in keys or ".zattrs" in keys:
            raise NotAStoreError(
                f"{url} is a zarr format 2 store written by another tool; attnlens stores are zarr "
                "format 3 groups with an 'attnlens' attribute"
            )
        if _half_initialised(store, children, url):
            if for_writing:
                return None
            raise StoreError(f"attnlens store {url} holds no samples yet: its first sample never finished")
        raise NotAStoreError(
            f"{url} is not a zarr store (no zarr.json); it holds files such as {choices(keys, 6)}"
        )
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise NotAStoreError(
            f"{url} is a zarr {meta.get('node_type', 'node')} (format {meta.get('zarr_format')}) written "
            "by another tool, not an attnlens store (a zarr format 3 group with an 'attnlens' attribute)"
        )
    attrs = meta.get("attributes", {})
    if _MARK not in attrs:
        if _half_initialised(store, children, url):
            if for_writing:
                return None
            raise StoreError(f"attnlens store {url} holds no samples yet: its first sample never finished")
        if not children and for_writing:
            return None
        raise NotAStoreError(
            f"{url} is a zarr group written by another tool (no 'attnlens' attribute); it holds "
            f"{choices([c.rstrip('/') for c in children], 8) or 'nothing'}"
        )
    mark = attrs[_MARK]
    version = mark.get("schema_version") if isinstance(mark, dict) else None
    if not isinstance(version, int):
        raise CorruptStoreError(f"{url}: the 'attnlens' attribute has no integer schema_version: {mark!r}")
    if version > SCHEMA_VERSION:
        from . import __version__

        raise StoreVersionError(
            f"{url} was written with store schema version {version}, newer than this attnlens "
            f"({__version__}) reads (up to {SCHEMA_VERSION}): upgrade attnlens to read it"
        )
    return attrs


def _open_group(store: Store, url: str, mode: str) -> tuple[zarr.Group, dict[str, zarr.Array]]:
    try:
        group = zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)
        arrays = {name: arr for name, arr in group.arrays()}
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStoreError(f"{url}: the store's metadata cannot be read ({exc})") from exc
    missing = [m for m in _META if m not in arrays]
    if missing:
        raise CorruptStoreError(f"{url}: the attnlens store lacks its {', '.join(missing)} array(s)")
    return group, arrays


def _strings(values: np.ndarray) -> np.ndarray:
    """Variable-length strings as read from zarr (numpy StringDType) → object arrays, as captured."""
    return values.astype(object) if values.dtype.kind in "TU" else values


def _read_flags(array: zarr.Array, n: int) -> np.ndarray:
    """Completion flags of the first ``n`` slots; a flag that cannot be read counts as not complete."""
    n = min(n, array.shape[0])
    try:
        return np.asarray(array[:n]) == 1
    except Exception:  # one damaged flag must not hide the other samples
        flags = np.zeros(n, dtype=bool)
        for pos in range(n):
            try:
                flags[pos] = array[pos] == 1
            except Exception:
                flags[pos] = False
        return flags


def _delete_slot(store: Store, array: zarr.Array, pos: int) -> None:
    """Remove every chunk (or shard) of ``array`` at sample slot ``pos``."""
    if array.ndim == 1:
        sync(store.delete(f"{array.path}/c/{pos}"))
    else:
        sync(store.delete_dir(f"{array.path}/c/{pos}"))


def _chunking(shape: Sequence[int], itemsize: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Chunk and shard shapes of a data variable of ``shape`` ``(sample, step, layer, ...)``.

    A chunk is one ``(sample, step, layer)``, split along the next dimensions (heads, then
    queries) while above 8 MiB. Chunks are packed into shards of one sample over layers, then
    steps, up to 128 MiB.

    >>> _chunking((10, 28, 57, 1, 4096, 512), 2)  # FLUX cross, head mean, fp16: 4 MiB chunks
    ((1, 1, 1, 1, 4096, 512), (1, 1, 32, 1, 4096, 512))
    >>> _chunking((10, 28, 57, 24, 4096, 512), 2)  # every head: split to 8 MiB
    ((1, 1, 1, 2, 4096, 512), (1, 1, 16, 2, 4096, 512))
    >>> _chunking((10, 28, 57, 24, 4608), 4)  # key_mass: 432 KiB chunks in shards of 5 steps
    ((1, 1, 1, 24, 4608), (1, 5, 57, 24, 4608))
    >>> _chunking((10, 4, 4, 1, 256), 4)  # small: one shard holds the whole sample
    ((1, 1, 1, 1, 256), (1, 4, 4, 1, 256))
    """
    chunk = [1, 1, 1, *(max(1, s) for s in shape[3:])]

    def nbytes(c: Sequence[int]) -> int:
        return math.prod(c) * itemsize

    axis = 3
    while nbytes(chunk) > _CHUNK_MAX and axis < len(chunk):
        if chunk[axis] > 1:
            chunk[axis] = -(-chunk[axis] // 2)
        else:
            axis += 1
    shard = list(chunk)
    for axis in (2, 1):  # a shard never spans samples, so that writers of disjoint samples never share one
        shard[axis] = max(1, min(shape[axis], _SHARD_MAX // nbytes(shard)))
    if shard == chunk:
        return tuple(chunk), None
    return tuple(chunk), tuple(shard)


def _zarr_dtype(values: np.ndarray) -> Any:
    return str if values.dtype.kind in "OUT" else values.dtype


def _fill(values: np.ndarray) -> Any:
    if values.dtype.kind in "OUT":
        return ""
    return np.nan if values.dtype.kind == "f" else 0


# -- writing ----------------------------------------------------------------------------------


class StoreWriter:
    """Writes finished sample groups to an attnlens store from a background thread.

    :func:`attnlens.capture` creates one when given ``store=``; use it directly to write
    Datasets of the :mod:`attnlens.schema` (e.g. ``cap.result``) to a store.

    Args:
        location: a local path, an fsspec URL (``file://``, ``memory://``, ``s3://``, ...), or a
            zarr v3 ``Store``.
        sample_ids: the ids of every sample the store will hold, the same list in every process
            that writes to it; ``None`` for a store that grows with each finished sample.
        storage_options: passed to fsspec for URLs.
        queue_size: finished sample groups waiting for the writer before :meth:`submit` blocks.
        compression: ``"zstd"`` (zstd with its frame checksum: a damaged chunk is reported,
            never read as data), ``"lz4"`` (blosc lz4 over byte-shuffled values) or ``None``
            (raw bytes, the fastest). Without zstd's checksum a truncated chunk is still
            reported, a flipped bit is not. Attention probabilities in float32 compress little
            (about 1.1×, see ``BENCHMARKS.md``).
        compression_level: the compressor's level (zstd: 1 is its fastest positive level).

    >>> import xarray as xr
    >>> from attnlens.schema import DIMS
    >>> ds = xr.Dataset({"key_mass": (DIMS["key_mass"], np.full((2, 1, 1, 1, 3), 1 / 3, "f4"))},
    ...                 coords={"sample": [0, 1], "layer": ["double.0"]}, attrs={"prompts": ["a", "b"]})
    >>> writer = StoreWriter("memory://doc/writer.zarr")
    >>> writer.submit(None, lambda: ds)
    >>> writer.close()
    >>> open_store("memory://doc/writer.zarr").key_mass.shape
    (2, 1, 1, 1, 3)
    """

    def __init__(
        self,
        location: StoreLike,
        *,
        sample_ids: Sequence[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        queue_size: int = 4,
        compression: str | None = "zstd",
        compression_level: int = 1,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise StoreError(f"unknown compression {compression!r}: choose from {choices(COMPRESSIONS)}")
        if sample_ids is not None:
            sample_ids = [str(s) for s in sample_ids]
            if not sample_ids or len(set(sample_ids)) != len(sample_ids) or "" in sample_ids:
                raise StoreError("sample_ids must be a non-empty list of distinct, non-empty ids")
        self.store, self.url = _resolve(location, storage_options, read_only=False)
        self.sample_ids = sample_ids
        self.compression = compression
        self.compression_level = compression_level
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._arrays: dict[str, zarr.Array] | None = None
        self._layout: dict[str, np.ndarray] = {}
        self._capture_attrs: dict[str, Any] = {}
        self._slots: list[str] = []  # id of each slot, by position
        self._index: dict[str, int] = {}
        attrs = _root(self.store, self.url, for_writing=True)
        if attrs is not None:
            self._load(attrs)

    # -- public ------------------------------------------------------------------------------

    @property
    def declared(self) -> bool:
        """Whether the store holds a fixed list of sample ids (and takes several writers)."""
        return self.sample_ids is not None

    def check_ids(self, ids: Sequence[str]) -> None:
        """Raise :class:`~attnlens.errors.StoreError` unless ``ids`` may be written here."""
        if self.sample_ids is not None:
            unknown = [i for i in ids if i not in self._declared_index]
            if unknown:
                raise StoreError(
                    f"sample id(s) {choices(unknown, 6)} are not among the {len(self.sample_ids)} sample_ids "
                    f"of {self.url} ({choices(self.sample_ids, 6)})"
                )

    def completed(self) -> list[str]:
        """Ids of the samples the store holds complete, read afresh (other writers may add some)."""
        attrs = _root(self.store, self.url, for_writing=True)
        if attrs is None:
            return []
        _, arrays = _open_group(self.store, self.url, "r")
        ids = _strings(np.asarray(arrays["sample_id"][:]))
        flags = _read_flags(arrays["sample_complete"], len(ids))
        return [str(ids[p]) for p in np.flatnonzero(flags)]

    def pending(self, ids: Sequence[str] | None = None) -> list[str]:
        """``ids`` (default: the declared sample ids) that the store does not hold complete, in order."""
        if ids is None:
            if self.sample_ids is None:
                raise StoreError(
                    f"{self.url} has no declared sample_ids: give the ids to check, e.g. cap.pending(ids)"
                )
            ids = self.sample_ids
        ids = [str(i) for i in ids]
        self.check_ids(ids)
        done = set(self.completed())
        return [i for i in ids if i not in done]

    def submit(self, ids: Sequence[str] | None, build: Callable[[], xr.Dataset]) -> None:
        """Queue one sample group for writing; blocks only while the queue is full.

        Args:
            ids: the ids of the group's samples, in order; ``None`` appends them under their
                slot numbers (growing stores only).
            build: returns the group as a Dataset of the :mod:`attnlens.schema`; called in the
                writer thread, so that stacking arrays does not hold up the model.

        Raises the error of an earlier write that failed (e.g. :class:`StoreFullError`).
        """
        self.raise_error()
        if ids is None and self.sample_ids is not None:
            raise StoreError(
                f"{self.url} declares its sample_ids: name each sample's forwards with `with cap.sample(id):`"
            )
        if ids is not None:
            ids = [str(i) for i in ids]
            self.check_ids(ids)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="attnlens-store-writer", daemon=True)
            self._thread.start()
        self._queue.put((ids, build))

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait until every queued group is written; then raise a write error, if any."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if raise_errors:
            self.raise_error()

    def raise_error(self) -> None:
        """Raise the error a background write met, once."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None:
                continue  # keep draining, so that submit never blocks on a dead writer
            try:
                self._write(*job)
            except BaseException as exc:
                self._error = self._explain(exc)

    def _explain(self, exc: BaseException) -> BaseException:
        done = self._count_complete()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            error: BaseException = StoreFullError(
                errno.ENOSPC,
                f"no space left on the device of {self.url} while writing a sample: the capture stopped; "
                f"the {done} sample(s) completed before remain readable (the unfinished one was removed). "
                "Free space and run the capture again: completed samples are skipped by cap.pending()",
            )
        elif isinstance(exc, StoreError | LayoutError):
            return exc
        elif isinstance(exc, OSError):
            error = StoreError(
                f"writing to {self.url} failed ({exc}); {done} completed sample(s) remain readable"
            )
        else:
            return exc
        error.__cause__ = exc
        return error

    def _count_complete(self) -> int:
        try:
            return len(self.completed())
        except Exception:
            return 0

    def _write(self, ids: list[str] | None, build: Callable[[], xr.Dataset]) -> None:
        ds = build()
        n = ds.sizes.get("sample", 0)
        if ids is not None and len(ids) != n:
            raise LayoutError(f"{len(ids)} sample id(s) {ids} were given for a group of {n} samples")
        if self._arrays is None:
            attrs = _root(self.store, self.url, for_writing=True)
            if attrs is None:
                self._initialise(ds)
            else:  # another process created the store meanwhile
                self._load(attrs)
        self._check_layout(ds)
        prompts = list(ds.attrs.get("prompts") or [])
        prompts += [""] * (n - len(prompts))
        for row, (pos, sid) in enumerate(self._claim(ids, n)):
            try:
                self._write_slot(ds, row, pos, sid, str(prompts[row]))
            except BaseException:
                self._discard(pos)
                raise

    def _write_slot(self, ds: xr.Dataset, row: int, pos: int, sid: str, prompt: str) -> None:
        arrays = self._arrays
        assert arrays is not None
        # unmark first: a crash from here on leaves the slot incomplete, never stale-but-valid
        _delete_slot(self.store, arrays["sample_complete"], pos)
        writes = [(arrays["prompt"], np.array(prompt, dtype=object))]
        if self.sample_ids is None:
            writes.append((arrays["sample_id"], np.array(sid, dtype=object)))
        for name, arr in arrays.items():
            if arr.attrs.get(_ROLE) in ("data", "per_sample"):
                writes.append((arr, np.asarray(ds[name].values[row])))

        async def write_all() -> None:  # all arrays at once: their chunks compress and land concurrently
            await asyncio.gather(*(arr.async_array.setitem(pos, value) for arr, value in writes))

        sync(write_all())
        self._mark_complete(pos)

    def _mark_complete(self, pos: int) -> None:
        """The commit point of a sample: written only after every one of its chunks."""
        assert self._arrays is not None
        self._arrays["sample_complete"][pos] = 1

    def _discard(self, pos: int) -> None:
        """Remove what a failed write left of slot ``pos`` (frees space on a full disk)."""
        for arr in (self._arrays or {}).values():
            if arr.attrs.get(_ROLE) in ("data", "per_sample") or arr.path == "sample_complete":
                with contextlib.suppress(Exception):  # best effort: an unflagged slot is never read
                    _delete_slot(self.store, arr, pos)

    def _claim(self, ids: list[str] | None, n: int) -> list[tuple[int, str]]:
        """Slot positions for a group's samples, growing the arrays where needed."""
        if self.sample_ids is not None:
            if ids is None:  # another process created the store with declared ids meanwhile
                raise StoreError(f"{self.url} declares its sample_ids: name each sample with cap.sample(id)")
            return [(self._declared_index[i], i) for i in ids]
        out: list[tuple[int, str]] = []
        end = len(self._slots)
        for i in range(n):
            sid = ids[i] if ids is not None else None
            if sid is not None and sid in self._index:
                out.append((self._index[sid], sid))
                continue
            if sid is None:
                sid = str(end)
                if sid in self._index:
                    raise StoreError(
                        f"{self.url}: the automatic id {sid!r} of a new sample is already taken by slot "
                        f"{self._index[sid]}; name samples with cap.sample(id) in this store"
                    )
            out.append((end, sid))
            end += 1
        if end > len(self._slots):
            self._grow(end, out)
        return out

    def _grow(self, end: int, new: list[tuple[int, str]]) -> None:
        arrays = self._arrays
        assert arrays is not None
        current = zarr.open_array(self.store, path="sample_id", mode="r").shape[0]
        if current != len(self._slots):
            raise StoreError(
                f"another process appended samples to {self.url} ({current} slots, {len(self._slots)} known "
                "here): a store without sample_ids takes one writer; declare sample_ids for several"
            )
        others = [a for n, a in arrays.items() if n != "sample_id" and a.attrs.get(_ROLE) != "layout"]

        async def resize_all() -> None:
            await asyncio.gather(*(a.async_array.resize((end, *a.shape[1:])) for a in others))

        sync(resize_all())
        # sample_id last: its length is the number of slots, so every other array is at least as long
        arrays["sample_id"].resize((end,))
        self._slots.extend([""] * (end - len(self._slots)))
        for pos, sid in new:
            self._slots[pos] = sid
            self._index[sid] = pos

    # -- layout ------------------------------------------------------------------------------

    @property
    def sample_ids(self) -> list[str] | None:
        """The declared sample ids, in slot order; ``None`` for a growing store."""
        return self._sample_ids

    @sample_ids.setter
    def sample_ids(self, ids: list[str] | None) -> None:
        self._sample_ids = ids
        self._declared_index = {s: i for i, s in enumerate(ids or [])}

    def _load(self, attrs: dict[str, Any]) -> None:
        _, arrays = _open_group(self.store, self.url, "r+")
        mode = attrs[_MARK].get("sample_ids")
        stored_ids = [str(s) for s in _strings(np.asarray(arrays["sample_id"][:]))]
        if mode == "declared":
            if self.sample_ids is not None and self.sample_ids != stored_ids:
                raise StoreError(
                    f"{self.url} was created for {len(stored_ids)} other sample_ids "
                    f"({choices(stored_ids, 6)}); every process must pass the same sample_ids"
                )
            self.sample_ids = stored_ids
        elif self.sample_ids is not None:
            raise StoreError(
                f"{self.url} grows sample by sample (it was created without sample_ids) and cannot take "
                "declared sample_ids; write to a new store, or leave sample_ids out"
            )
        self._slots = stored_ids if mode != "declared" else []
        self._index = {s: i for i, s in enumerate(self._slots) if s}
        self._layout = {
            name: _strings(np.asarray(arr[...]))
            for name, arr in arrays.items()
            if arr.attrs.get(_ROLE) == "layout"
        }
        self._capture_attrs = dict(attrs.get("capture", {}))
        self._arrays = arrays

    def _initialise(self, ds: xr.Dataset) -> None:
        """Create the arrays of the store from its first sample group, then mark the root."""
        group = zarr.open_group(self.store, mode="a", zarr_format=3, use_consolidated=False)
        slots = len(self.sample_ids) if self.sample_ids is not None else 0
        compressors = self._compressors()
        for name in sorted(ds.data_vars):
            values = ds[name]
            chunks, shards = _chunking(values.shape, values.dtype.itemsize)
            self._create(
                group,
                name,
                role="data",
                shape=(slots, *values.shape[1:]),
                dtype=values.dtype,
                chunks=chunks,
                shards=shards,
                fill_value=_fill(values.values),
                dims=values.dims,
                compressors=compressors,
            )
        for name, coord in ds.coords.items():
            if name == "sample":
                continue
            values = np.asarray(coord.values)
            if "sample" in coord.dims:
                self._create(
                    group,
                    str(name),
                    role="per_sample",
                    shape=(slots, *values.shape[1:]),
                    dtype=_zarr_dtype(values),
                    chunks=(1, *values.shape[1:]),
                    fill_value=_fill(values),
                    dims=coord.dims,
                    compressors=compressors,
                )
            else:
                arr = self._create(
                    group,
                    str(name),
                    role="layout",
                    shape=values.shape,
                    dtype=_zarr_dtype(values),
                    chunks=tuple(max(1, s) for s in values.shape),
                    fill_value=_fill(values),
                    dims=coord.dims,
                    compressors=compressors,
                )
                arr[...] = values  # identical bytes from every process that gets here
        strings = dict(dtype=str, fill_value="", dims=("sample",), compressors=compressors)
        ids = self._create(
            group, "sample_id", role="meta", shape=(slots,), chunks=(max(1, slots),), **strings
        )
        if self.sample_ids is not None:
            ids[:] = np.array(self.sample_ids, dtype=object)
        else:
            ids = zarr.open_array(self.store, path="sample_id", mode="r+")
            if ids.chunks != (1,):  # a growing store writes one id per slot
                raise LayoutError(f"{self.url}: a half-created store of another kind lies here; delete it")
        self._create(group, "prompt", role="meta", shape=(slots,), chunks=(1,), **strings)
        self._create(
            group,
            "sample_complete",
            role="meta",
            shape=(slots,),
            dtype="uint8",
            chunks=(1,),
            fill_value=0,
            dims=("sample",),
            compressors=[Crc32cCodec()],  # a truncated flag fails its checksum and reads as incomplete
        )
        from . import __version__

        capture = {k: v for k, v in ds.attrs.items() if k not in ("prompts", "schema_version")}
        mark = {
            "schema_version": SCHEMA_VERSION,
            "sample_ids": "declared" if self.sample_ids is not None else "growing",
            "written_by": f"attnlens {__version__}",
        }
        # the commit point: a group without this attribute is not (yet) an attnlens store
        group.update_attributes({_MARK: mark, "capture": _jsonable(capture)})
        self._load(_root(self.store, self.url, for_writing=True) or {})

    def _compressors(self) -> list:
        if self.compression == "zstd":
            return [ZstdCodec(level=self.compression_level, checksum=True)]
        if self.compression == "lz4":
            return [BloscCodec(cname="lz4", clevel=self.compression_level, shuffle="shuffle")]
        # no checksum codec: zarr runs crc32c in its event loop, which would serialise every write
        return []

    def _create(
        self,
        group: zarr.Group,
        name: str,
        *,
        role: str,
        shape: tuple[int, ...],
        dtype: Any,
        chunks: tuple[int, ...],
        fill_value: Any,
        dims: Sequence[str],
        compressors: list,
        shards: tuple[int, ...] | None = None,
    ) -> zarr.Array:
        try:
            return group.create_array(
                name,
                shape=shape,
                dtype=dtype,
                chunks=chunks,
                shards=shards,
                fill_value=fill_value,
                compressors=compressors,
                dimension_names=tuple(dims),
                attributes={_ROLE: role},
                config={"write_empty_chunks": True},  # a written slot always has its chunks
            )
        except zarr.errors.ContainsArrayError:  # another process, or an interrupted first write
            arr = zarr.open_array(self.store, path=name, mode="r+")
            if arr.shape[1:] != shape[1:] or tuple(arr.metadata.dimension_names or ()) != tuple(dims):
                raise LayoutError(
                    f"{self.url}: array {name!r} exists with shape {arr.shape} and dims "
                    f"{arr.metadata.dimension_names}, but this capture needs {shape} {tuple(dims)}; "
                    "write to another store"
                ) from None
            return arr

    def _check_layout(self, ds: xr.Dataset) -> None:
        """Raise :class:`LayoutError` unless ``ds`` fits the arrays of the store."""
        arrays = self._arrays
        assert arrays is not None
        where = f"the store {self.url}"
        stored = sorted(n for n, a in arrays.items() if a.attrs.get(_ROLE) == "data")
        if sorted(ds.data_vars) != stored:
            raise LayoutError(f"{where} holds {stored}, this capture keeps {sorted(ds.data_vars)}")
        for name in stored:
            arr, values = arrays[name], ds[name]
            if arr.shape[1:] != values.shape[1:] or arr.dtype != values.dtype:
                raise LayoutError(
                    f"{where} holds {name!r} per sample as {arr.shape[1:]} {arr.dtype}, this capture "
                    f"gives {values.shape[1:]} {values.dtype} (other steps, layers, heads, tokens or dtype); "
                    "a store holds samples of one layout: write these to another store"
                )
        for name, values in self._layout.items():
            if name not in ds.coords or not _same(values, np.asarray(ds[name].values)):
                mine = np.asarray(ds[name].values) if name in ds.coords else "nothing"
                raise LayoutError(
                    f"{where} holds samples with {name} = {_short(values)}, this capture has {_short(mine)}; "
                    "a store holds samples of one layout: write these to another store"
                )
        for key in ("config_hash", "model_class"):
            if key in self._capture_attrs and self._capture_attrs[key] != ds.attrs.get(key):
                raise LayoutError(
                    f"{where} was written from a model with {key} {self._capture_attrs[key]!r}, this "
                    f"capture's model has {ds.attrs.get(key)!r}: write to another store"
                )


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.all(a == b))


def _short(values: Any) -> str:
    values = np.asarray(values)
    return choices(values.ravel().tolist(), 6) if values.ndim else str(values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


# -- reading ----------------------------------------------------------------------------------


class _ChunkReader:
    """Array-like over a zarr array for ``dask.array.from_array``, with clear read errors."""

    def __init__(self, array: zarr.Array, url: str, ids: np.ndarray) -> None:
        self.array = array
        self.url = url
        self.ids = ids
        self.shape = array.shape
        self.ndim = array.ndim
        self.strings = array.dtype.kind in "TU" or str(array.dtype).startswith("String")
        self.dtype = np.dtype(object) if self.strings else array.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            out = np.asarray(self.array[key])
        except OSError as exc:
            raise StoreError(f"cannot read {self.array.path!r} from {self.url}: {exc}") from exc
        except Exception as exc:  # the codecs raise ValueError/RuntimeError on bad bytes
            raise CorruptStoreError(
                f"{self.url}: a chunk of {self.array.path!r} for {self._samples(key)} cannot be decoded "
                f"({type(exc).__name__}: {exc}); the file is truncated or corrupt. Capture the sample again "
                "(`with cap.sample(id):` overwrites it) or restore the store from a copy"
            ) from exc
        return out.astype(object) if self.strings else out

    def _samples(self, key: Any) -> str:
        """The samples of a failed read whose own chunks fail: the read may span good ones too."""
        key = key if isinstance(key, tuple) else (key,)
        first = key[0]
        positions = list(range(self.shape[0])[first]) if isinstance(first, slice) else [int(first)]
        if len(positions) > 1:
            bad = []
            for p in positions:
                try:
                    self.array[(p, *key[1:])]
                except Exception:
                    bad.append(p)
            positions = bad or positions
        names = [f"{self.ids[p]!r}" if p < len(self.ids) else str(p) for p in positions]
        return f"sample(s) {choices(names, 4)}"


def _lazy(array: zarr.Array, url: str, ids: np.ndarray, positions: np.ndarray) -> Any:
    """A dask array over ``array``'s slots ``positions`` (along its first axis, ``sample``)."""
    import dask.array as da

    reader = _ChunkReader(array, url, ids)
    block = list(array.shards or array.chunks)
    itemsize = 16 if reader.strings else reader.dtype.itemsize
    if array.attrs.get(_ROLE) == "data":
        # one sample per task, so that a damaged or missing sample spoils no read of the others;
        # whole storage blocks along layers, then steps, up to the target size
        for axis in (2, 1):
            per = max(1, _DASK_CHUNK // (math.prod(block) * itemsize))
            block[axis] = min(array.shape[axis], block[axis] * per)
    else:  # a few bytes per sample: many samples per task
        block[0] = max(1, _DASK_CHUNK // (math.prod(block) * itemsize))
    x = da.from_array(
        reader,
        chunks=tuple(min(b, max(1, s)) for b, s in zip(block, array.shape, strict=True)),
        name=f"attnlens-{array.path}-{uuid.uuid4().hex}",
        asarray=False,
        lock=False,
        fancy=False,
        meta=np.empty((0,) * array.ndim, dtype=reader.dtype),
    )
    if len(positions) and np.array_equal(positions, np.arange(len(positions))):
        return x[: len(positions)]
    return x[positions]


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
        StoreVersionError: a store written by a newer attnlens.
        CorruptStoreError: damaged metadata; damaged chunks raise it when read.

    >>> open_store("memory://nowhere.zarr")
    Traceback (most recent call last):
    ...
    attnlens.errors.StoreNotFoundError: no attnlens store at memory://nowhere.zarr: nothing exists there
    """
    store, url = _resolve(location, storage_options, read_only=True)
    attrs = _root(store, url, for_writing=False)
    assert attrs is not None
    _, arrays = _open_group(store, url, "r")
    ids = _strings(np.asarray(arrays["sample_id"][:]))
    positions = np.flatnonzero(_read_flags(arrays["sample_complete"], len(ids)))
    prompts = _strings(np.asarray(arrays["prompt"][: len(ids)])) if len(ids) else np.array([], dtype=object)
    data_vars: dict[str, Any] = {}
    coords: dict[str, Any] = {}
    for name, arr in sorted(arrays.items()):
        role = arr.attrs.get(_ROLE)
        dims = tuple(arr.metadata.dimension_names or ())
        if role == "data":
            data_vars[name] = (dims, _lazy(arr, url, ids, positions))
        elif role == "per_sample":
            coords[name] = (dims, _lazy(arr, url, ids, positions))
        elif role == "layout":
            coords[name] = (dims, _strings(np.asarray(arr[...])))
    coords["sample"] = positions.astype(np.int64)
    coords["sample_id"] = ("sample", ids[positions].astype(object))
    out_attrs = {**attrs.get("capture", {}), "schema_version": attrs[_MARK]["schema_version"]}
    out_attrs["prompts"] = [str(p) for p in prompts[positions]]
    ds = xr.Dataset(data_vars, coords=coords, attrs=out_attrs)
    ds.encoding["source"] = url
    ds.encoding["sample_slots"] = len(ids)  # complete or not; declared stores hold one per sample id
    return ds


def stored_bytes(location: StoreLike, *, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Bytes each array of a store takes on its storage (after compression).

    >>> sizes = stored_bytes("memory://doc/writer.zarr")
    >>> sizes["key_mass"] > 0
    True
    """
    store, url = _resolve(location, storage_options, read_only=True)
    _root(store, url, for_writing=False)
    _, arrays = _open_group(store, url, "r")
    return {name: int(arr.nbytes_stored()) for name, arr in sorted(arrays.items())}


def verify_store(location: StoreLike, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Read every chunk of every complete sample; return one message per damaged sample and array.

    >>> verify_store("memory://doc/writer.zarr")
    []
    """
    ds = open_store(location, storage_options=storage_options)
    problems = []
    for name, var in {**ds.data_vars, **{k: ds[k] for k in ds.coords if "sample" in ds[k].dims}}.items():
        if name in ("sample", "sample_id"):
            continue
        for pos in range(ds.sizes["sample"]):
            try:
                var.isel(sample=pos).compute()
            except StoreError as exc:
                problems.append(f"{name}, sample {str(ds.sample_id.values[pos])!r}: {exc}")
    return problems
