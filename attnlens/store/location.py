"""Locating a store and telling what a location holds, before anything is read or written.

A location is a local path, an fsspec URL or a zarr v3 ``Store``. :func:`read_root` says whether
it holds an attnlens store (and which), is free for a writer to start one, or holds something
else; :func:`open_arrays` opens the arrays a store's root lists and checks their metadata
against the digests the writer recorded, so that a deleted array or edited metadata is found
when the store is opened, never read as data. The key-level helpers (exclusive creation, lists,
free space) are the primitives of the writer's claim protocol.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from ..errors import (
    CorruptStoreError,
    NotAStoreError,
    StoreError,
    StoreNotFoundError,
    StoreVersionError,
    choices,
)
from ..schema import SCHEMA_VERSION

__all__ = [
    "MARK",
    "META",
    "STORE_VERSION",
    "StoreLike",
    "create_once",
    "delete_keys",
    "free_bytes",
    "get_bytes",
    "get_json",
    "json_bytes",
    "list_names",
    "metadata_digest",
    "open_arrays",
    "put_bytes",
    "read_root",
    "resolve",
    "run_all",
]

StoreLike = str | os.PathLike | Store

MARK = "attnlens"  # root attribute that makes a zarr group an attnlens store
META = "_attnlens"  # the group of sample records, leases and claims (not arrays)
#: version of the store's layout (records, index, chunk keys); a store of an older layout is refused
STORE_VERSION = 2


# -- locations ------------------------------------------------------------------------------


def resolve(
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


def local_root(store: Store) -> str | None:
    """The folder of a store on a local file system (``LocalStore`` or fsspec ``file://``), else ``None``."""
    root = getattr(store, "root", None)
    if root is not None:
        return os.fspath(root)
    fs = getattr(store, "fs", None)
    if fs is not None and "file" in _protocols(fs):
        return os.path.abspath(store.path)
    return None


def _protocols(fs: Any) -> tuple[str, ...]:
    fs = getattr(fs, "sync_fs", fs)  # fsspec's async wrapper around a synchronous file system
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def free_bytes(store: Store) -> int | None:
    """Free bytes on the disk of a local store; ``None`` where the storage does not say (object stores)."""
    root = local_root(store)
    if root is None:
        return None
    path = os.path.abspath(root)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def run_all(coroutines: Iterable[Any]) -> list[Any]:
    """Run coroutines concurrently on zarr's event loop, from any thread; their results in order."""

    async def gather() -> list[Any]:
        return list(await asyncio.gather(*coroutines))

    return sync(gather())


# -- keys -----------------------------------------------------------------------------------


def json_bytes(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, so that equal content gives equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _buffer(data: bytes) -> Any:
    return default_buffer_prototype().buffer.from_bytes(data)


async def get_bytes(store: Store, key: str) -> bytes | None:
    buf = await store.get(key, prototype=default_buffer_prototype())
    return None if buf is None else buf.to_bytes()


async def put_bytes(store: Store, key: str, data: bytes) -> None:
    await store.set(key, _buffer(data))


def get_json(store: Store, key: str, url: str) -> dict[str, Any] | None:
    """A JSON object stored at ``key``; ``None`` when absent; :class:`CorruptStoreError` when damaged."""
    return _parse(sync(get_bytes(store, key)), key, url)


def _parse(data: bytes | None, key: str, url: str) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise CorruptStoreError(
            f"{url}: {key} is not valid JSON ({exc}); the store's metadata is damaged"
        ) from exc
    if not isinstance(value, dict):
        raise CorruptStoreError(
            f"{url}: {key} holds {type(value).__name__}, not a JSON object; it is damaged"
        )
    return value


async def create_once(store: Store, key: str, data: bytes) -> bool:
    """Write ``data`` at ``key`` unless something is there already; whether this call wrote it.

    Atomic on local disks (a hard link of a fully written temporary file, as zarr's own
    exclusive writes) and on object stores whose fsspec file system implements
    ``pipe_file(mode="create")`` as a conditional write (``If-None-Match``: s3fs, gcsfs, adlfs
    and fsspec's memory file system); other zarr stores get a check-then-write.
    """
    root = local_root(store)
    if root is not None:
        return await asyncio.to_thread(_link_once, os.path.join(root, key), data)
    async with _CREATING:  # in-memory file systems check, then create: one at a time in this process
        fs = getattr(store, "fs", None)
        if fs is not None:
            try:
                await fs._pipe_file(f"{store.path.rstrip('/')}/{key}", data, mode="create")
            except FileExistsError:
                return False
            return True
        if await store.exists(key):
            return False
        await store.set_if_not_exists(key, _buffer(data))
        return await get_bytes(store, key) == data


_CREATING = asyncio.Lock()  # zarr runs every store call on its one event loop


def _link_once(path: str, data: bytes) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    with open(partial, "wb") as f:
        f.write(data)
    try:
        os.link(partial, path)  # fails if the name exists, whoever made it
    except FileExistsError:
        return False
    finally:
        os.unlink(partial)
    return True


async def delete_keys(store: Store, keys: Iterable[str]) -> None:
    await asyncio.gather(*(store.delete(k) for k in keys))


async def list_names(store: Store, prefix: str) -> list[str]:
    """Names (files and folders) directly under ``prefix``; empty when it does not exist."""
    root = local_root(store)
    if root is not None:  # os.scandir: zarr's LocalStore.list_dir builds a Path per entry, 10× slower
        return await asyncio.to_thread(_scandir, os.path.join(root, prefix))
    try:
        return [name async for name in store.list_dir(prefix)]
    except FileNotFoundError:
        return []


def _scandir(path: str) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return [e.name for e in entries]
    except (FileNotFoundError, NotADirectoryError):
        return []


# -- what a location holds ------------------------------------------------------------------


def read_root(store: Store, url: str, *, for_writing: bool) -> dict[str, Any] | None:
    """The root attributes of an attnlens store; ``None`` where a writer may start a new one.

    Raises the store errors that name what the location holds instead.
    """
    meta = get_json(store, "zarr.json", url)
    attrs = (meta or {}).get("attributes", {})
    if meta is not None and MARK in attrs:
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
            raise CorruptStoreError(f"{url}: zarr.json is not that of a zarr format 3 group; it is damaged")
        _check_versions(attrs[MARK], url)
        return attrs
    # a file being written atomically (zarr's "<name>.<uuid>.partial") is not there yet
    keys = sorted(k for k in sync(list_names(store, "")) if not k.endswith(".partial"))
    if meta is None and "zarr.json" in keys:  # another writer created the root meanwhile
        return read_root(store, url, for_writing=for_writing)
    children = [k for k in keys if k != "zarr.json"]
    started = META in children  # a writer creates this group first and marks the root last
    if meta is None and not keys:
        if for_writing:
            return None
        if not _location_exists(store):
            raise StoreNotFoundError(f"no attnlens store at {url}: nothing exists there")
        raise NotAStoreError(
            f"{url} is an empty folder, not an attnlens store: capture into it with "
            "attnlens.capture(..., store=...) first"
        )
    if meta is None and {".zgroup", ".zarray", ".zattrs"} & set(keys):
        raise NotAStoreError(
            f"{url} is a zarr format 2 store written by another tool; attnlens stores are zarr "
            "format 3 groups with an 'attnlens' attribute"
        )
    if meta is not None and (meta.get("zarr_format") != 3 or meta.get("node_type") != "group"):
        raise NotAStoreError(
            f"{url} is a zarr {meta.get('node_type', 'node')} (format {meta.get('zarr_format')}) written "
            "by another tool, not an attnlens store (a zarr format 3 group with an 'attnlens' attribute)"
        )
    if started:
        if for_writing:
            return None
        raise StoreError(f"attnlens store {url} holds no samples yet: its first sample never finished")
    if meta is None:
        raise NotAStoreError(
            f"{url} is not a zarr store (no zarr.json); it holds files such as {choices(keys, 6)}"
        )
    if not children and for_writing:
        return None
    raise NotAStoreError(
        f"{url} is a zarr group written by another tool (no 'attnlens' attribute); it holds "
        f"{choices([c.rstrip('/') for c in children], 8) or 'nothing'}"
    )


def _location_exists(store: Store) -> bool:
    fs, path = getattr(store, "fs", None), getattr(store, "path", None)
    if fs is not None and path is not None:
        return bool(sync(fs._exists(path)))
    root = getattr(store, "root", None)
    return root is None or os.path.exists(root)


def _check_versions(mark: Any, url: str) -> None:
    from .. import __version__

    schema = mark.get("schema_version") if isinstance(mark, dict) else None
    layout = mark.get("store_version", 1) if isinstance(mark, dict) else None
    if not isinstance(schema, int) or not isinstance(layout, int):
        raise CorruptStoreError(f"{url}: the 'attnlens' attribute has no integer schema_version: {mark!r}")
    if schema > SCHEMA_VERSION or layout > STORE_VERSION:
        raise StoreVersionError(
            f"{url} was written with store schema version {schema} (layout {layout}), newer than this "
            f"attnlens ({__version__}) reads (up to {SCHEMA_VERSION}, layout {STORE_VERSION}): "
            "upgrade attnlens to read it"
        )
    if layout < STORE_VERSION:
        raise StoreVersionError(
            f"{url} was written by an earlier attnlens (store layout {layout}, without sample records); "
            f"this attnlens ({__version__}) reads layout {STORE_VERSION}: capture it again"
        )


def metadata_digest(meta: Mapping[str, Any], *, per_sample: bool) -> str:
    """A digest of an array's ``zarr.json``; a growing store's sample extent is left out (it changes)."""
    meta = dict(meta)
    if per_sample:
        meta["shape"] = list(meta.get("shape", []))[1:]
    return hashlib.sha256(json_bytes(meta)).hexdigest()[:16]


def open_arrays(store: Store, url: str, mark: Mapping[str, Any], *, mode: str = "r") -> dict[str, zarr.Array]:
    """The arrays the store's root lists, opened; raises :class:`CorruptStoreError` for every one
    that is missing or whose metadata differs from what the writer recorded."""
    listed: dict[str, Any] = mark.get("arrays", {})

    async def one(name: str) -> tuple[str, bytes | None]:
        return name, await get_bytes(store, f"{name}/zarr.json")

    found = dict(run_all(one(name) for name in listed))
    problems = metadata_problems(listed, found, url)
    if problems:
        raise CorruptStoreError(f"{url}: {'; '.join(problems)}")
    try:
        return {name: zarr.open_array(store, path=name, mode=mode, zarr_format=3) for name in listed}
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStoreError(f"{url}: the store's metadata cannot be read ({exc})") from exc


def metadata_problems(listed: Mapping[str, Any], found: Mapping[str, bytes | None], url: str) -> list[str]:
    """One message per listed array whose ``zarr.json`` is missing, damaged or edited."""
    problems = []
    for name, entry in listed.items():
        data = found.get(name)
        if data is None:
            problems.append(f"array {name!r} is missing ({name}/zarr.json is gone)")
            continue
        try:
            meta = _parse(data, f"{name}/zarr.json", url)
        except CorruptStoreError as exc:
            problems.append(str(exc).removeprefix(f"{url}: "))
            continue
        if metadata_digest(meta, per_sample=entry["role"] != "layout") != entry["digest"]:
            problems.append(
                f"the metadata of array {name!r} ({name}/zarr.json) differs from what its writer recorded: "
                "it was edited or damaged"
            )
    return problems


class StateWrapper(WrapperStore):
    """A wrapper store with state of its own, which zarr's read-only twin shares.

    zarr asks a store for its read-only twin when an array is opened with ``mode="r"``;
    :class:`~zarr.storage.WrapperStore` builds it from the wrapped store alone, which a
    wrapper with further constructor arguments cannot take.
    """

    def _with_store(self, store: Store) -> StateWrapper:
        twin = copy.copy(self)
        twin._store = store
        return twin
