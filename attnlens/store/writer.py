"""The store writer: finished samples in, zarr chunks and sample records out, on a background thread.

A sample is written in four moves: its slot is found (:class:`_Declared` or :class:`_Growing`,
the two ways a store numbers its samples), leased, filled chunk by chunk, and committed with a
record of what it wrote (:mod:`.records`). What a crash leaves behind is never read: a slot
without its record is incomplete, and the next writer of that sample takes its lease over.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import itertools
import json
import math
import queue
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync

from ..errors import LayoutError, StoreError, StoreFullError, choices
from ..schema import SCHEMA_VERSION
from . import layout as lay
from .location import (
    MARK,
    META,
    STORE_VERSION,
    StateWrapper,
    StoreLike,
    create_once,
    delete_keys,
    free_bytes,
    get_bytes,
    get_json,
    json_bytes,
    local_root,
    metadata_digest,
    open_arrays,
    read_root,
    resolve,
)
from .planning import format_bytes
from .records import (
    LIVE_WRITERS,
    crc32c,
    drop_lease,
    load_records,
    old_records,
    take_lease,
    write_index,
    write_record,
)

__all__ = ["SampleStream", "StoreWriter"]

DECLARED = f"{META}/declared.json"
WRITE = {"write_empty_chunks": True}  # a written slot always has its chunks, even all-NaN ones
_OVERLAP = 2  # streamed regions written at once: two keep a disk busy, and bound what is held
_NOTHING = object()
CLAIMS = f"{META}/claims"  # growing stores: one object per slot ever handed out
IDS = f"{META}/ids"  # growing stores: sample id -> slot, created once per id

# -- how a store numbers its samples ----------------------------------------------------------


class _Declared:
    """One slot per declared sample id, from the start; any number of writers fill disjoint slots."""

    mode = "declared"

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.index = {s: i for i, s in enumerate(ids)}

    def check(self, ids: Sequence[str], url: str) -> None:
        unknown = [i for i in ids if i not in self.index]
        if unknown:
            raise StoreError(
                f"sample id(s) {choices(unknown, 6)} are not among the {len(self.ids)} sample_ids "
                f"of {url} ({choices(self.ids, 6)})"
            )

    def capacity(self, pos: int) -> int:
        return len(self.ids)

    async def slot(self, store: Store, url: str, sample_id: str | None, token: str) -> tuple[int, str]:
        if sample_id is None:
            raise StoreError(
                f"{url} declares its sample_ids: name each sample's forwards with `with cap.sample(id):`"
            )
        self.check([sample_id], url)
        return self.index[sample_id], sample_id


class _Growing:
    """A slot per new sample, claimed by creating ``_attnlens/claims/<slot>`` exclusively.

    Claims form a prefix ``0 … n-1``: a writer claims the first free slot (a galloping search
    from the last one it knows), and one that loses a race for it moves on to the next, so
    that appenders in several processes never share a slot. A sample id is bound to its slot
    once (``_attnlens/ids/<hash>``), so that a named sample is never stored twice.
    """

    mode = "growing"

    def __init__(self) -> None:
        self.next = 0

    def check(self, ids: Sequence[str], url: str) -> None:
        pass

    def capacity(self, pos: int) -> int:
        """Arrays grow by doubling, so that appending rewrites their metadata rarely."""
        return max(64, 1 << pos.bit_length())

    async def slot(self, store: Store, url: str, sample_id: str | None, token: str) -> tuple[int, str]:
        if sample_id is not None:
            bound = await _bound_slot(store, sample_id)
            if bound is not None:
                return bound, sample_id  # rewrite (or resume) a sample of this id
        pos = await self._claim(store, token)
        named = sample_id is not None
        sample_id = sample_id if named else str(pos)
        if await create_once(store, _id_key(sample_id), json_bytes({"id": sample_id, "slot": pos})):
            return pos, sample_id
        bound = await _bound_slot(store, sample_id)
        if not named or bound is None:
            raise StoreError(
                f"{url}: the automatic id {sample_id!r} of a new sample is already taken by another sample; "
                "name samples with cap.sample(id) in this store"
            )
        return bound, sample_id  # another writer bound this id meanwhile: the slot claimed here stays empty

    async def _claim(self, store: Store, token: str) -> int:
        pos = self.next
        while not await create_once(store, f"{CLAIMS}/{pos}", token.encode()):
            pos = await _first_free(store, pos + 1)
        self.next = pos + 1
        return pos


def _id_key(sample_id: str) -> str:
    return f"{IDS}/{hashlib.sha256(sample_id.encode()).hexdigest()[:32]}"


async def _bound_slot(store: Store, sample_id: str) -> int | None:
    data = await get_bytes(store, _id_key(sample_id))
    if data is None:
        return None
    return int(json.loads(data)["slot"])


async def _first_free(store: Store, start: int) -> int:
    """The first unclaimed slot from ``start`` on, in O(log n) existence checks (claims form a prefix)."""

    async def taken(pos: int) -> bool:
        return await store.exists(f"{CLAIMS}/{pos}")

    if not await taken(start):
        return start
    step = 1
    while await taken(start + step):
        step *= 2
    low, high = start + step // 2, start + step  # low is taken, high is free
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if await taken(mid) else (low, mid)
    return high


# -- what a writer wrote ----------------------------------------------------------------------


class _Recorder(StateWrapper):
    """The writer's view of the store: records the size and crc32c of every chunk written, by slot."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.per_sample: set[str] = set()  # arrays with a sample dimension (their first chunk index)
        self._written: dict[int | None, dict[str, tuple[int, int]]] = {}  # slot (None: no sample dim)
        self._lock = threading.Lock()

    async def set(self, key: str, value: Any) -> None:
        data = value.as_numpy_array()
        if data.size < 2**20:  # a small chunk: its checksum costs less than a thread's hand-over
            crc = crc32c(data)
            await self._store.set(key, value)
        else:  # in a worker thread, beside the write: the event loop keeps dispatching other chunks
            crc, _ = await asyncio.gather(asyncio.to_thread(crc32c, data), self._store.set(key, value))
        entry = (int(data.size), crc)
        array, _, rest = key.rpartition("/")
        if rest.startswith("c."):
            slot = int(rest[2:].split(".", 1)[0]) if array in self.per_sample else None
            with self._lock:
                self._written.setdefault(slot, {})[key] = entry

    def take(self, slot: int | None) -> dict[str, tuple[int, int]]:
        """The chunks written for ``slot`` since the last call, forgotten here."""
        with self._lock:
            return self._written.pop(slot, {})


def _slot_keys(array: zarr.Array, pos: int) -> list[str]:
    """Storage keys (chunks, or shards) of sample slot ``pos`` of ``array``."""
    meta = array.metadata
    block = meta.chunk_grid.chunk_shape  # the shard shape of a sharded array
    grid = [range(math.ceil(s / b)) for s, b in zip(meta.shape[1:], block[1:], strict=True)]
    return [f"{array.path}/{meta.encode_chunk_key((pos, *i))}" for i in itertools.product(*grid)]


def _regions(shape: Sequence[int], block: Sequence[int]) -> list[tuple[slice, ...]]:
    """The storage blocks of one sample ``shape`` (without ``sample``), as slices."""
    return [
        tuple(slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(idx, block, shape, strict=True))
        for idx in itertools.product(*(range(math.ceil(s / b)) for s, b in zip(shape, block, strict=True)))
    ]


# -- streams ----------------------------------------------------------------------------------


class SampleStream:
    """One variable of one sample, written region by region before the rest of the sample.

    Made by :meth:`StoreWriter.stream`; each :meth:`write` is queued to the writer thread (at
    most ``queue_size`` regions wait), so that nothing larger than a region is held for the
    store. The sample is complete once :meth:`StoreWriter.submit` hands over its other
    variables; every element of the streamed variable must have been written once by then.

    Attributes:
        sample_id: the sample's id (given, or numbered by a growing store).
        name: the variable, e.g. ``"full"``.
        sizes: its dims (without ``sample``) and sizes, in order.
        chunks: the block the store writes at once, per dim: regions made of whole blocks
            are written without reading anything back.
        growing: the dim :meth:`grow` may extend (``stream(..., growing="step")``), or ``None``.
        fixed: whether the store already holds samples, whose size of ``growing`` this one must match.
    """

    def __init__(
        self,
        writer: StoreWriter,
        slot: int,
        sample_id: str,
        name: str,
        sizes: dict[str, int],
        block: Sequence[int],
    ) -> None:
        self._writer = writer
        self.slot = slot
        self.sample_id = sample_id
        self.name = name
        self.sizes = sizes
        self.auto = False
        self.growing: str | None = None
        self.fixed = True
        self.itemsize = 4  # bytes per element on disk
        self.chunks = dict(zip(sizes, block, strict=True))
        grid = [math.ceil(s / c) for s, c in zip(sizes.values(), self.chunks.values(), strict=True)]
        self._covered = np.zeros(grid, dtype=np.int64)  # elements written per block

    def write(self, values: np.ndarray, **region: int | slice) -> None:
        """Queue ``values`` for the region of the sample named by ``region`` (dims → index or slice).

        Dims left out are taken whole; ``values`` has the region's shape (integer-indexed dims
        dropped). The array is read when the writer gets to it: do not change it afterwards.
        """
        unknown = [d for d in region if d not in self.sizes]
        if unknown:
            raise LayoutError(f"{self.name} has dims {list(self.sizes)}, not {unknown}")
        index = []
        for dim, size in self.sizes.items():
            sel = region.get(dim, slice(None))
            start, stop, step = (
                (int(sel), int(sel) + 1, 1) if isinstance(sel, int | np.integer) else sel.indices(size)
            )
            if step != 1 or not 0 <= start < stop <= size:
                raise LayoutError(f"{self.name}: {dim}={sel!r} is not a range within 0…{size}")
            index.append(slice(start, stop))
        shape = tuple(s.stop - s.start for s in index)
        values = np.asarray(values)
        if values.size != math.prod(shape):
            raise LayoutError(f"{self.name}: values of shape {values.shape} do not fill the region {shape}")
        values = values.reshape(shape)  # restores integer-indexed dims
        self._cover(index)
        aligned = all(  # whole blocks: no other region's write reads or rewrites them
            sel.start % chunk == 0 and (sel.stop % chunk == 0 or sel.stop == size)
            for sel, chunk, size in zip(index, self.chunks.values(), self.sizes.values(), strict=True)
        )
        self._writer._enqueue(lambda: self._writer._write_region(self, tuple(index), values), overlap=aligned)

    def grow(self, size: int) -> None:
        """Extend the ``growing`` dim to ``size`` (e.g. a new step of the store's first sample).

        Only while the store holds no committed sample: its array is resized (metadata only,
        as ``full`` is chunked by one step); the new part is checked against the disk's free
        space first. In a store that holds samples, whose size is fixed, it raises
        :class:`~attnlens.errors.LayoutError` naming both sizes.
        """
        dim = self.growing
        if dim is None or size <= self.sizes[dim]:
            if dim is None:
                raise LayoutError(f"{self.name} of sample {self.sample_id!r} was not streamed with growing=")
            return
        if self.fixed:
            raise LayoutError(
                f"the store {self._writer.url} holds {self.name!r} over {self.sizes[dim]} {dim}(s) per "
                f"sample, but sample {self.sample_id!r} goes on to {size} {dim}(s): a store holds samples "
                f"of one {dim} count; write this sample to another store"
            )
        axis = list(self.sizes).index(dim)
        per_index = math.prod(n for d, n in self.sizes.items() if d != dim)
        added = (size - self.sizes[dim]) * per_index * self.itemsize
        self._writer.check_space(added, f"keeping {self.name!r} of {dim} {size}")
        self.sizes[dim] = size
        grid = math.ceil(size / self.chunks[dim])
        pad = [(0, 0)] * self._covered.ndim
        pad[axis] = (0, grid - self._covered.shape[axis])
        self._covered = np.pad(self._covered, pad)
        self._writer._enqueue(lambda: self._writer._grow(self.name, axis + 1, size))

    def discard(self) -> None:
        """Give the sample up: what was written of it is removed, and its slot stays empty."""
        writer = self._writer
        try:
            writer._streams.remove(self)
        except ValueError:
            return  # submitted or discarded already
        writer._enqueue(lambda: writer._discard(self.slot))

    def _cover(self, index: list[slice]) -> None:
        self._covered += self._overlap([(s.start, s.stop) for s in index])

    def _overlap(self, ranges: list[tuple[int, int]]) -> np.ndarray:
        """Elements of the region ``ranges`` (start, stop per dim) in each storage block."""
        per_dim = []
        for (start, stop), chunk, n in zip(ranges, self.chunks.values(), self._covered.shape, strict=True):
            starts = np.arange(n) * chunk
            per_dim.append(np.clip(np.minimum(starts + chunk, stop) - np.maximum(starts, start), 0, None))
        return functools.reduce(np.multiply, np.ix_(*per_dim))

    def missing(self) -> int:
        """Elements not written exactly once (0 when the stream is complete)."""
        whole = self._overlap([(0, n) for n in self.sizes.values()])
        return int(np.abs(whole - self._covered).sum())


# -- the writer -------------------------------------------------------------------------------


class StoreWriter:
    """Writes finished samples to an attnlens store from a background thread.

    :func:`attnlens.capture` creates one when given ``store=``; make one yourself to choose its
    options, or to write Datasets of the :mod:`attnlens.schema` (e.g. ``cap.result``).

    Args:
        location: a local path, an fsspec URL (``file://``, ``memory://``, ``s3://``, ...) or a
            zarr v3 ``Store``.
        sample_ids: the ids of every sample the store will hold, the same list in every process
            that writes to it; ``None`` for a store that grows with each new sample.
        storage_options: passed to fsspec for URLs.
        queue_size: samples (or streamed regions) waiting for the writer before :meth:`submit`
            (:meth:`SampleStream.write`) blocks; two more regions may be being written.
        layout: ``"chunks"`` (large chunks: local disks), ``"shards"`` (one step and layer per
            inner chunk, packed in shards: object stores, where reading one layer should not
            fetch its neighbours) or ``"auto"`` (``"chunks"`` on local disks, else ``"shards"``).
        compression: ``None`` (the default and the fastest: attention probabilities compress
            about 1.1×), ``"zstd"`` or ``"lz4"`` (blosc, byte-shuffled).
        compression_level: the compressor's level.
        storage_dtype: dtype of the attention probabilities on disk (``cross``, ``text_to_image``,
            ``key_mass``, ``full``): ``None`` (as captured), ``"float16"`` or ``"bfloat16"``;
            ``hidden_norm`` keeps its dtype. See the docs for the precision each keeps.

    >>> import xarray as xr
    >>> from attnlens.schema import DIMS
    >>> ds = xr.Dataset({"key_mass": (DIMS["key_mass"], np.full((2, 1, 1, 1, 3), 1 / 3, "f4"))},
    ...                 coords={"sample": [0, 1], "layer": ["double.0"]}, attrs={"prompts": ["a", "b"]})
    >>> writer = StoreWriter("memory://doc/writer.zarr")
    >>> writer.submit(None, lambda: ds)
    >>> writer.close()
    >>> from attnlens.store import open_store
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
        layout: str = "auto",
        compression: str | None = None,
        compression_level: int = 1,
        storage_dtype: str | None = None,
    ) -> None:
        lay.check_option("layout", layout, lay.LAYOUTS)
        lay.check_option("compression", compression, lay.COMPRESSIONS)
        lay.check_option("storage dtype", storage_dtype, lay.STORAGE_DTYPES)
        if sample_ids is not None:
            sample_ids = [str(s) for s in sample_ids]
            if not sample_ids or len(set(sample_ids)) != len(sample_ids) or "" in sample_ids:
                raise StoreError("sample_ids must be a non-empty list of distinct, non-empty ids")
        self.store, self.url = resolve(location, storage_options, read_only=False)
        self.layout = layout if layout != "auto" else ("chunks" if local_root(self.store) else "shards")
        self.compression = compression
        self.compression_level = compression_level
        self.storage_dtype = storage_dtype
        self.token = uuid.uuid4().hex
        LIVE_WRITERS[self.token] = self
        self._store = _Recorder(self.store)
        self._slots: _Declared | _Growing = _Declared(sample_ids) if sample_ids is not None else _Growing()
        self._given_ids = sample_ids
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._arrays: dict[str, zarr.Array] | None = None
        self._arrays_for_streams: dict[str, zarr.Array] = {}  # streamed arrays made before the store's others
        self._roles: dict[str, str] = {}
        self._layout: dict[str, np.ndarray] = {}
        self._capture_attrs: dict[str, Any] = {}
        self._extent = 0  # samples every per-sample array holds room for
        self._streams: list[SampleStream] = []  # begun, awaiting the rest of their sample
        self._wrote = False
        attrs = read_root(self.store, self.url, for_writing=True)
        if attrs is not None:
            self._load(attrs)

    # -- public ------------------------------------------------------------------------------

    @property
    def sample_ids(self) -> list[str] | None:
        """The declared sample ids, in slot order; ``None`` for a growing store."""
        return self._slots.ids if isinstance(self._slots, _Declared) else None

    @property
    def declared(self) -> bool:
        """Whether the store holds a fixed list of sample ids (and takes several writers)."""
        return isinstance(self._slots, _Declared)

    def check_ids(self, ids: Sequence[str]) -> None:
        """Raise :class:`~attnlens.errors.StoreError` unless ``ids`` may be written here."""
        self._slots.check([str(i) for i in ids], self.url)

    def completed(self) -> list[str]:
        """Ids of the samples the store holds complete, read afresh (other writers may add some)."""
        if read_root(self.store, self.url, for_writing=True) is None:
            return []
        return load_records(self.store, self.url).ids

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

    def check_space(self, nbytes: int, what: str = "this capture") -> None:
        """Raise :class:`~attnlens.errors.StoreFullError` now if ``nbytes`` more would not fit the disk.

        Only local disks tell their free space; elsewhere nothing is checked.
        """
        free = free_bytes(self.store)
        if free is not None and nbytes > free:
            raise StoreFullError(
                errno.ENOSPC,
                f"{what} needs {format_bytes(nbytes)} in {self.url}, but its disk has {format_bytes(free)} "
                "free: nothing was written. Free space, or keep less (fewer layers, steps or heads, "
                "heads='mean', a float16 storage dtype); `attnlens plan` estimates a capture's size "
                "before it runs",
            )

    def submit(self, ids: Sequence[str] | None, build: Callable[[], xr.Dataset]) -> None:
        """Queue one sample group for writing; blocks only while the queue is full.

        Args:
            ids: the ids of the group's samples, in order; ``None`` numbers them (growing stores).
            build: returns the group as a Dataset of the :mod:`attnlens.schema`; called in the
                writer thread, so that stacking arrays does not hold up the model. Variables
                streamed with :meth:`stream` are left out of it.

        Raises the error of an earlier write that failed (e.g. :class:`StoreFullError`).
        """
        self.raise_error()
        if ids is None and self.declared:
            raise StoreError(
                f"{self.url} declares its sample_ids: name each sample's forwards with `with cap.sample(id):`"
            )
        if ids is not None:
            ids = [str(i) for i in ids]
            self.check_ids(ids)
        self._enqueue(lambda: self._write(ids, build))

    def stream(
        self,
        sample_id: str | None,
        name: str,
        sizes: Mapping[str, int],
        dtype: Any = np.float32,
        *,
        growing: str | None = None,
    ) -> SampleStream:
        """Begin one sample by writing one variable of it region by region, e.g. ``full`` by query chunks.

        Claims the sample's slot (numbering it in a growing store when ``sample_id`` is
        ``None``) and refuses at once, with the size, a variable that would not fit the disk.

        Args:
            sample_id: the sample's id.
            name: a variable of :data:`attnlens.schema.DIMS`, e.g. ``"full"``.
            sizes: its dims without ``sample`` and their sizes, in order, e.g.
                ``{"step": 28, "layer": 57, "head": 24, "query_all": 4608, "key": 4608}``.
            dtype: the dtype of the values to be written (before the storage dtype).
            growing: a dim whose size is not known yet (``"step"``: a capture learns a sample's
                step count when it ends). In a store that holds no sample yet, ``sizes`` gives
                its size so far and :meth:`SampleStream.grow` extends it; in one that does, the
                stream takes the store's size (``stream.sizes``) and ``grow`` past it raises.

        >>> writer = StoreWriter("memory://doc/stream.zarr")
        >>> s = writer.stream("a", "full", {"step": 1, "layer": 1, "head": 1, "query_all": 4, "key": 4})
        >>> for q in range(4):
        ...     s.write(np.full(4, 0.25, "f4"), step=0, layer=0, head=0, query_all=q)
        """
        self.raise_error()
        from ..schema import DIMS

        if name not in DIMS or tuple(sizes) != DIMS[name][1:]:
            raise LayoutError(f"stream a variable of the schema with its dims, e.g. full {DIMS['full'][1:]}")
        if sample_id is not None:
            self.check_ids([str(sample_id)])
        if growing is not None and growing not in sizes:
            raise LayoutError(f"{name} has no dim {growing!r} to grow: its dims are {list(sizes)}")
        dtype = lay.storage_dtype(name, np.dtype(dtype), self.storage_dtype)
        if growing is None:  # a growing stream is checked once its size is known, by the writer
            self.check_space(math.prod(sizes.values()) * dtype.itemsize, f"keeping {name!r} of one sample")
        begin = functools.partial(self._begin_stream, sample_id, name, dict(sizes), dtype, growing)
        stream = self._enqueue(begin).result()
        stream.auto = sample_id is None
        self._streams.append(stream)
        return stream

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait until every queued sample is written, consolidate the index; then raise a write error."""
        if self._streams:  # begun but never submitted (the capture ended early): leave nothing half-written
            self._enqueue(self._discard_streams)
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._wrote:
            self._wrote = False
            with contextlib.suppress(Exception):  # the index is a cache: the store is complete without it
                write_index(self.store, load_records(self.store, self.url))
        if raise_errors:
            self.raise_error()

    def raise_error(self) -> None:
        """Raise the error a background write met, once."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    # -- the writer thread -------------------------------------------------------------------

    def _enqueue(self, job: Callable[[], Any], *, overlap: bool = False) -> concurrent.futures.Future:
        """Queue ``job`` for the writer thread; its future holds what it returns, or the error it met.

        A job may return a coroutine, which is run; with ``overlap``, beside the next one queued so.
        """
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="attnlens-store-writer", daemon=True)
            self._thread.start()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((job, done, overlap))
        return done

    def _run(self) -> None:
        held: Any = _NOTHING  # an item taken from the queue that did not fit the last batch
        while True:
            item, held = (self._queue.get() if held is _NOTHING else held), _NOTHING
            if item is None:
                return
            batch = [item]
            while item[2] and len(batch) < _OVERLAP:  # streamed regions queued back to back land together
                try:
                    following = self._queue.get_nowait()
                except queue.Empty:
                    break
                if following is None or not following[2]:
                    held = following
                    break
                batch.append(following)
            self._do(batch)

    def _do(self, batch: list[tuple[Callable[[], Any], concurrent.futures.Future, bool]]) -> None:
        if self._error is not None:  # keep draining, so that nobody waits on a dead writer
            for _, done, _ in batch:
                done.set_exception(self._error)
            return
        try:
            results = [job() for job, _, _ in batch]  # coroutines (streamed regions) run together below
            if any(asyncio.iscoroutine(r) for r in results):

                async def together() -> list[Any]:
                    return await asyncio.gather(*results)

                results = sync(together())
        except BaseException as exc:
            self._error = self._explain(exc)
            for _, done, _ in batch:
                done.set_exception(self._error)
            return
        for (_, done, _), result in zip(batch, results, strict=True):
            done.set_result(result)

    def _explain(self, exc: BaseException) -> BaseException:
        if isinstance(exc, StoreError | LayoutError):
            return exc
        if not isinstance(exc, OSError):
            return exc
        done = self._count_complete()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            error: BaseException = StoreFullError(
                errno.ENOSPC,
                f"no space left on the device of {self.url} while writing a sample: the capture stopped; "
                f"the {done} sample(s) completed before remain readable (the unfinished one was removed). "
                "Free space and run the capture again: completed samples are skipped by cap.pending()",
            )
        else:
            error = StoreError(
                f"writing to {self.url} failed ({exc}); {done} completed sample(s) remain readable"
            )
        error.__cause__ = exc
        return error

    def _count_complete(self) -> int:
        try:
            return len(self.completed())
        except Exception:
            return 0

    def _write(self, ids: list[str] | None, build: Callable[[], xr.Dataset]) -> None:
        """Write one sample group: every sample's slot, chunks and record at once (their I/O overlaps)."""
        ds = build()
        n = ds.sizes.get("sample", 0)
        if ids is not None and len(ids) != n:
            raise LayoutError(f"{len(ids)} sample id(s) {ids} were given for a group of {n} samples")
        if self._arrays is None:
            self._setup(ds)
        prompts = [str(p) for p in ds.attrs.get("prompts") or []]
        prompts += [""] * (n - len(prompts))
        streams = [self._take_stream(ids[row] if ids is not None else None) for row in range(n)]
        slots = {row: (s.slot, s.sample_id) for row, s in enumerate(streams) if s is not None}
        done: list[int] = []  # slots committed
        try:
            for streamed in {frozenset([s.name] if s is not None else []) for s in streams}:
                self._check_layout(ds, set(streamed))
            fresh = [row for row in range(n) if streams[row] is None]
            begun = sync(self._begin_all([ids[r] if ids is not None else None for r in fresh]))
            slots.update(zip(fresh, begun, strict=True))
            sync(self._write_rows(ds, slots, streams))
            for stream in streams:
                if stream is not None and stream.missing():
                    raise LayoutError(
                        f"{stream.name!r} of sample {stream.sample_id!r} was streamed incompletely: "
                        f"{stream.missing()} element(s) were written never or more than once"
                    )

            async def commit_all() -> None:
                async def one(row: int) -> None:
                    pos, sample_id = slots[row]
                    await self._commit(pos, sample_id, prompts[row])
                    done.append(pos)

                await asyncio.gather(*(one(row) for row in range(n)))

            sync(commit_all())
        except BaseException:
            for pos, _ in slots.values():
                if pos not in done:
                    self._discard(pos)
            raise

    def _discard_streams(self) -> None:
        streams, self._streams = self._streams, []
        for stream in streams:
            self._discard(stream.slot)

    def _take_stream(self, sample_id: str | None) -> SampleStream | None:
        for i, stream in enumerate(self._streams):
            if (sample_id is None and stream.auto) or stream.sample_id == sample_id:
                return self._streams.pop(i)
        return None

    async def _begin_all(self, sample_ids: list[str | None]) -> list[tuple[int, str]]:
        """Find, lease and empty the slots of some samples; from here on they are incomplete."""
        found = []
        for sample_id in sample_ids:  # one by one: a growing store numbers the group's samples in order
            found.append(await self._slots.slot(self.store, self.url, sample_id, self.token))
        leased = await asyncio.gather(
            *(take_lease(self.store, self.url, pos, s, self.token) for pos, s in found),
            return_exceptions=True,
        )
        taken = [
            pos
            for (pos, _), result in zip(found, leased, strict=True)
            if not isinstance(result, BaseException)
        ]
        try:
            failed = [result for result in leased if isinstance(result, BaseException)]
            if failed:
                raise failed[0]
            if found:
                await self._ensure_extent(max(pos for pos, _ in found))
            await delete_keys(self.store, await old_records(self.store, [pos for pos, _ in found]))
        except BaseException:
            await asyncio.gather(*(drop_lease(self.store, pos) for pos in taken))
            raise
        for pos, _ in found:
            self._store.take(pos)
        self._wrote = True
        return list(found)

    async def _write_rows(
        self, ds: xr.Dataset, slots: dict[int, tuple[int, str]], streams: list[SampleStream | None]
    ) -> None:
        """Every storage block of the group's samples (but their streamed variables), all at once."""
        assert self._arrays is not None
        jobs = []
        for name, arr in self._arrays.items():
            if self._roles[name] not in ("data", "per_sample") or name not in ds.variables:
                continue  # a variable streamed for every sample of the group
            values = np.asarray(ds[name].values)
            if values.dtype.kind in "OU":
                values = values.astype(object)
            regions = _regions(values.shape[1:], arr.metadata.chunk_grid.chunk_shape[1:])
            for row, (pos, _) in slots.items():
                if streams[row] is not None and streams[row].name == name:
                    continue
                for region in regions:  # one block a call: zarr writes a value the shape of a chunk as is
                    jobs.append(
                        self._put(arr, (slice(pos, pos + 1), *region), values[(slice(row, row + 1), *region)])
                    )
        await asyncio.gather(*jobs)

    async def _put(self, arr: zarr.Array, index: tuple[slice, ...], values: np.ndarray) -> None:
        """Write one storage block, converted to the storage dtype in a worker thread."""
        if lay.storage_dtype(arr.basename, values.dtype, self.storage_dtype) != values.dtype:
            values = await asyncio.to_thread(lay.encode, values, self.storage_dtype)
        await arr.async_array.setitem(index, values)

    async def _commit(self, pos: int, sample_id: str, prompt: str) -> None:
        """The commit point of a sample: its record, written after every one of its chunks."""
        assert self._arrays is not None
        written = self._store.take(pos)
        expected = [
            key
            for name, arr in self._arrays.items()
            if self._roles[name] != "layout"
            for key in _slot_keys(arr, pos)
        ]
        missing = [k for k in expected if k not in written]
        if missing:
            raise StoreError(f"{self.url}: sample {sample_id!r} left chunks unwritten: {choices(missing, 4)}")
        await write_record(self.store, pos, sample_id, prompt, written)
        await drop_lease(self.store, pos)

    def _discard(self, pos: int) -> None:
        """Remove what a failed write left of slot ``pos`` (frees space on a full disk); best effort."""
        keys = [
            key
            for name, arr in (self._arrays or self._arrays_for_streams).items()
            if self._roles.get(name, "data") != "layout"
            for key in _slot_keys(arr, pos)
        ]
        self._store.take(pos)
        with contextlib.suppress(Exception):  # an unrecorded slot is never read
            sync(delete_keys(self.store, keys))
        with contextlib.suppress(Exception):
            sync(drop_lease(self.store, pos))

    async def _ensure_extent(self, pos: int) -> None:
        """Grow the per-sample arrays (to the next power of two) so that they hold slot ``pos``."""
        if pos < self._extent:
            return
        names = [
            n for n in {**self._arrays_for_streams, **(self._arrays or {})} if self._roles.get(n) != "layout"
        ]
        opened = await asyncio.gather(  # afresh: other writers may have grown them
            *(zarr.api.asynchronous.open_array(store=self._store, path=n, mode="r+") for n in names)
        )
        size = self._slots.capacity(pos)
        await asyncio.gather(
            *(
                a.resize((size, *a.shape[1:]), delete_outside_chunks=False)
                for a in opened
                if a.shape[0] <= pos
            )
        )
        for name, arr in zip(names, opened, strict=True):
            owner = (
                self._arrays
                if self._arrays is not None and name in self._arrays
                else self._arrays_for_streams
            )
            owner[name] = zarr.Array(arr.with_config(WRITE))
        self._extent = min((a.shape[0] for a in opened), default=0)

    async def _write_region(self, stream: SampleStream, index: tuple[slice, ...], values: np.ndarray) -> None:
        arrays = (
            self._arrays
            if self._arrays is not None and stream.name in self._arrays
            else self._arrays_for_streams
        )
        arr = arrays[stream.name]
        await self._put(arr, (slice(stream.slot, stream.slot + 1), *index), values[np.newaxis])

    def _grow(self, name: str, axis: int, size: int, *, exact: bool = False) -> None:
        """Resize the streamed array ``name`` along ``axis`` to ``size`` (at least), re-read afresh.

        ``exact``: to ``size`` itself, if the array exists (left by a first sample that was
        discarded: the store holds no sample yet).
        """
        try:
            arr = zarr.open_array(self._store, path=name, mode="r+")
        except zarr.errors.ArrayNotFoundError:
            if exact:
                return
            raise
        if arr.shape[axis] < size or (exact and arr.shape[axis] != size):
            shape = list(arr.shape)
            shape[axis] = size
            arr.resize(tuple(shape))
        if not exact:
            self._arrays_for_streams[name] = arr.with_config(WRITE)

    def _begin_stream(
        self, sample_id: str | None, name: str, sizes: dict[str, int], dtype: np.dtype, growing: str | None
    ) -> SampleStream:
        if self._arrays is None:
            attrs = read_root(self.store, self.url, for_writing=True)
            if attrs is not None:
                self._load(attrs)
        fixed = self._arrays is not None
        axis = list(sizes).index(growing) if growing is not None else -1
        if fixed and growing is not None and self._roles.get(name) == "data":
            sizes[growing] = self._arrays[name].shape[1 + axis]  # type: ignore[index]
        elif not fixed and growing is not None and name in self._arrays_for_streams:
            sizes[growing] = max(sizes[growing], self._arrays_for_streams[name].shape[1 + axis])
            self._grow(name, 1 + axis, sizes[growing])
        elif not fixed and growing is not None:
            self._grow(name, 1 + axis, sizes[growing], exact=True)
        if growing is not None:
            what = f"keeping {name!r} of one sample" if fixed else f"keeping {name!r} of its first {growing}s"
            self.check_space(math.prod(sizes.values()) * dtype.itemsize, what)
        if self._arrays is not None:
            if self._roles.get(name) != "data" or self._arrays[name].shape[1:] != tuple(sizes.values()):
                raise LayoutError(
                    f"the store {self.url} holds no {name!r} of sizes {sizes}: write to another store"
                )
        elif name not in self._arrays_for_streams:
            extent = self._slots.capacity(0)
            self._arrays_for_streams[name] = self._create(
                _open_group(self._store),
                name,
                shape=(extent, *sizes.values()),
                dtype=dtype,
                dims=("sample", *sizes),
                data=True,
            )
            self._roles[name] = "data"
            self._store.per_sample.add(name)
            self._extent = extent
        ((pos, sample_id),) = sync(self._begin_all([sample_id]))
        array = (self._arrays or self._arrays_for_streams)[name]
        stream = SampleStream(self, pos, sample_id, name, sizes, array.metadata.chunk_grid.chunk_shape[1:])
        stream.growing, stream.fixed, stream.itemsize = growing, fixed, dtype.itemsize
        return stream

    # -- setting up ----------------------------------------------------------------------------

    def _setup(self, ds: xr.Dataset) -> None:
        attrs = read_root(self.store, self.url, for_writing=True)
        if attrs is None:
            self._initialise(ds)
        else:  # another process created the store meanwhile
            self._load(attrs)

    def _load(self, attrs: dict[str, Any]) -> None:
        mark = attrs[MARK]
        if mark.get("sample_ids") == "declared":
            declared = get_json(self.store, DECLARED, self.url) or {}
            ids = [str(s) for s in declared.get("ids", [])]
            if self._given_ids is not None and self._given_ids != ids:
                raise StoreError(
                    f"{self.url} was created for {len(ids)} other sample_ids ({choices(ids, 6)}); every "
                    "process must pass the same sample_ids"
                )
            self._slots = _Declared(ids)
        elif self._given_ids is not None:
            raise StoreError(
                f"{self.url} grows sample by sample (it was created without sample_ids) and cannot take "
                "declared sample_ids; write to a new store, or leave sample_ids out"
            )
        arrays = {
            n: a.with_config(WRITE) for n, a in open_arrays(self._store, self.url, mark, mode="r+").items()
        }
        self._roles = {name: entry["role"] for name, entry in mark["arrays"].items()}
        self._store.per_sample = {n for n, r in self._roles.items() if r != "layout"}
        self._layout = {
            n: _strings(np.asarray(a[...])) for n, a in arrays.items() if self._roles[n] == "layout"
        }
        self._capture_attrs = dict(attrs.get("capture", {}))
        self._extent = min((a.shape[0] for n, a in arrays.items() if self._roles[n] != "layout"), default=0)
        self._arrays = arrays
        self._arrays_for_streams = {}

    def _initialise(self, ds: xr.Dataset) -> None:
        """Create the arrays of the store from its first sample group, then mark the root."""
        group = _open_group(self._store)
        _open_group(self._store, META)  # a store being started
        if isinstance(self._slots, _Declared):
            ids = json_bytes({"ids": self._slots.ids})
            if not sync(create_once(self.store, DECLARED, ids)):
                declared = get_json(self.store, DECLARED, self.url) or {}
                if declared.get("ids") != self._slots.ids:
                    raise StoreError(
                        f"{self.url}: another process is creating this store for other sample_ids"
                    )
        extent = max(self._extent, self._slots.capacity(0))
        self._store.per_sample = set(self._arrays_for_streams) | set(ds.data_vars)
        self._store.per_sample |= {
            str(n) for n, c in ds.coords.items() if "sample" in c.dims and n != "sample"
        }
        roles = dict.fromkeys(self._arrays_for_streams, "data")
        for name in sorted(ds.data_vars):
            values = ds[name]
            self._create(
                group,
                str(name),
                shape=(extent, *values.shape[1:]),
                dtype=lay.storage_dtype(str(name), values.dtype, self.storage_dtype),
                dims=values.dims,
                data=True,
            )
            roles[str(name)] = "data"
        for name, coord in ds.coords.items():
            if name == "sample":
                continue
            values = np.asarray(coord.values)
            per_sample = "sample" in coord.dims
            shape = (extent, *values.shape[1:]) if per_sample else values.shape
            arr = self._create(
                group,
                str(name),
                shape=shape,
                dtype=values.dtype,
                dims=coord.dims,
                data=False,
                chunks=(1, *values.shape[1:]) if per_sample else None,
            )
            roles[str(name)] = "per_sample" if per_sample else "layout"
            if not per_sample:
                arr[...] = (
                    values.astype(object) if values.dtype.kind in "OU" else values
                )  # identical from every process

        async def metadata() -> list[bytes | None]:
            return await asyncio.gather(*(get_bytes(self.store, f"{n}/zarr.json") for n in roles))

        found = sync(metadata())
        listed = {
            name: {"role": role, "digest": metadata_digest(json.loads(data), per_sample=role != "layout")}
            for (name, role), data in zip(roles.items(), found, strict=True)
        }
        capture = _jsonable({k: v for k, v in ds.attrs.items() if k not in ("prompts", "schema_version")})
        from .. import __version__

        mark = {
            "schema_version": SCHEMA_VERSION,
            "store_version": STORE_VERSION,
            "sample_ids": self._slots.mode,
            "slots": len(self._slots.ids) if isinstance(self._slots, _Declared) else None,
            "written_by": f"attnlens {__version__}",
            "arrays": listed,
            "layout_chunks": {k: list(v) for k, v in sorted(self._store.take(None).items())},
            "capture_digest": _digest(capture),
        }
        # the commit point of the store: a group without this attribute is not (yet) an attnlens store
        group.update_attributes({MARK: mark, "capture": capture})
        self._load(read_root(self.store, self.url, for_writing=True) or {})

    def _create(
        self,
        group: zarr.Group,
        name: str,
        *,
        shape: tuple[int, ...],
        dtype: Any,
        dims: Sequence[str],
        data: bool,
        chunks: tuple[int, ...] | None = None,
    ) -> zarr.Array:
        dtype = np.dtype(dtype)
        strings = dtype.kind in "OUT"
        shards = None
        if data:
            chunks, shards = lay.chunking(shape, dtype.itemsize, self.layout, name)
        elif chunks is None:
            chunks = tuple(max(1, s) for s in shape)
        attributes = (
            {lay.STORAGE_ATTR: self.storage_dtype}
            if data and self.storage_dtype == "bfloat16" and dtype == np.uint16
            else {}
        )
        if strings:
            fill: Any = ""
        elif dtype.kind == "f":
            fill = np.nan
        else:
            fill = 0x7FC0 if attributes else 0  # bfloat16's NaN
        try:
            return group.create_array(
                name,
                shape=shape,
                dtype=str if strings else dtype,
                chunks=chunks,
                shards=shards,
                fill_value=fill,
                compressors=lay.compressors(
                    self.compression, self.compression_level, sharded=shards is not None
                )
                if data
                else [],
                dimension_names=tuple(dims),
                attributes=attributes,
                chunk_key_encoding=lay.KEY_ENCODING,
                config=WRITE,
            )
        except zarr.errors.ContainsArrayError:  # another process, or an interrupted first write
            arr = zarr.open_array(self._store, path=name, mode="r+").with_config(WRITE)
            if arr.shape[1:] != shape[1:] or tuple(arr.metadata.dimension_names or ()) != tuple(dims):
                raise LayoutError(
                    f"{self.url}: array {name!r} exists with shape {arr.shape} and dims "
                    f"{arr.metadata.dimension_names}, but this capture needs {shape} {tuple(dims)}; "
                    "write to another store"
                ) from None
            return arr

    def _check_layout(self, ds: xr.Dataset, streamed: set[str]) -> None:
        """Raise :class:`LayoutError` unless ``ds`` fits the arrays of the store."""
        arrays = self._arrays
        assert arrays is not None
        where = f"the store {self.url}"
        stored = sorted(n for n, r in self._roles.items() if r == "data")
        given = sorted({*map(str, ds.data_vars), *streamed})
        if given != stored or streamed & set(map(str, ds.data_vars)):
            raise LayoutError(f"{where} holds {stored}, this capture keeps {given}")
        for name in stored:
            if name in streamed:
                continue
            arr, values = arrays[name], ds[name]
            dtype = lay.storage_dtype(name, values.dtype, self.storage_dtype)
            if arr.shape[1:] != values.shape[1:] or arr.dtype != dtype:
                raise LayoutError(
                    f"{where} holds {name!r} per sample as {arr.shape[1:]} {arr.dtype}, this capture "
                    f"gives {values.shape[1:]} {dtype} (other steps, layers, heads, tokens or dtype); "
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


def _open_group(store: Store, path: str = "") -> zarr.Group:
    """Open or create a group; where another writer creates it at the same moment, open theirs."""
    try:
        return zarr.open_group(store, path=path, mode="a", zarr_format=3, use_consolidated=False)
    except zarr.errors.ContainsGroupError:  # created between zarr's check and its create
        return zarr.open_group(store, path=path, mode="r+", zarr_format=3, use_consolidated=False)


def _digest(value: Any) -> str:
    return hashlib.sha256(json_bytes(value)).hexdigest()[:16]


def _strings(values: np.ndarray) -> np.ndarray:
    """Variable-length strings as read from zarr (numpy StringDType) → object arrays, as captured."""
    return values.astype(object) if values.dtype.kind in "TU" else values


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
