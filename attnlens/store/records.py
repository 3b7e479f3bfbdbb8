"""Sample records: which samples a store holds complete, and what each one wrote.

A sample is complete once its **record** exists: a small JSON object written after every one of
its chunks, holding its id, prompt and the key, size and crc32c of each chunk it wrote. Records
live under ``_attnlens/samples/<slot // 1024>/<slot>.<token>.json`` (a fresh token per write), so
that listing the folders tells which samples are complete, and a record's name changes whenever
its sample is rewritten.

Reading 10⁵ records one by one takes minutes on an object store; the **index**
(``_attnlens/index.json``) consolidates them: each writer rewrites it when it closes. It is a
cache keyed by record names: records listed but not in the index are read, index entries whose
record is gone are dropped, so the index can be stale or missing but never wrong. A damaged
index (its crc32c fails) is ignored.

A **lease** (``_attnlens/leases/<slot>``, created exclusively) marks a slot while a writer
writes it, so that two writers never write one sample at once; it names the writer's host and
process, so that a lease left by a writer that died on the same host is taken over.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import numpy as np
from zarr.abc.store import Store
from zarr.core.sync import sync

from ..errors import CorruptStoreError, StoreError
from .location import META, create_once, delete_keys, get_bytes, json_bytes, list_names, put_bytes

__all__ = [
    "LIVE_WRITERS",
    "Records",
    "crc32c",
    "load_records",
    "read_record",
    "write_index",
    "write_record",
]

SAMPLES = f"{META}/samples"
LEASES = f"{META}/leases"
INDEX = f"{META}/index.json"
BLOCK = 1024  # records per folder: listing one slot's records reads one folder of at most this many
_BATCH = 512  # objects read at once


#: writers alive in this process, by token: a lease of this process whose writer is gone is stale
LIVE_WRITERS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def crc32c(data: Any) -> int:
    """crc32c of a bytes-like object (zarr's checksum; about 10 GB/s)."""
    return google_crc32c.value(np.frombuffer(data, dtype=np.uint8))


@dataclass
class Records:
    """What a store's records say, read at one moment: the complete samples in columns, by slot.

    Columns rather than an object per sample, so that 10⁵ samples load in a few tens of ms.
    """

    names: list[str] = field(default_factory=list)  # each record's "<block>/<slot>.<token>.json"
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # ascending
    ids: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    nbytes: dict[str, np.ndarray] = field(default_factory=dict)  # bytes each array wrote, per sample
    #: slots whose record cannot be read, or that hold two records (written twice at once): message
    damaged: dict[int, str] = field(default_factory=dict)
    leased: dict[int, dict[str, Any]] = field(default_factory=dict)  # being written, or left by a crash
    index_damaged: bool = False

    def __len__(self) -> int:
        return len(self.names)

    @property
    def extent(self) -> int:
        """Slots in use: one past the last complete, damaged or leased slot."""
        used = [int(self.slots[-1]) if len(self.slots) else -1, *self.damaged, *self.leased]
        return max(used) + 1

    def find(self, slot: int) -> int | None:
        """The position of ``slot`` among the complete samples, ``None`` if it is not one."""
        pos = int(np.searchsorted(self.slots, slot))
        return pos if pos < len(self.slots) and self.slots[pos] == slot else None


def record_name(slot: int, token: str) -> str:
    return f"{slot // BLOCK}/{slot}.{token}.json"


def slot_of(name: str) -> int:
    return int(name.rsplit("/", 1)[-1].split(".", 1)[0])


def _nbytes(body: Mapping[str, Any]) -> dict[str, int]:
    """Bytes each array wrote, from a record's chunk list."""
    out: dict[str, int] = {}
    for key, (size, _) in body["chunks"].items():
        array = key.split("/", 1)[0]
        out[array] = out.get(array, 0) + int(size)
    return out


async def write_record(
    store: Store, slot: int, sample_id: str, prompt: str, chunks: Mapping[str, tuple[int, int]]
) -> None:
    """Commit a sample: its record, written after every one of its chunks."""
    body = {
        "slot": slot,
        "id": sample_id,
        "prompt": prompt,
        "chunks": {k: list(v) for k, v in sorted(chunks.items())},
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    await put_bytes(store, f"{SAMPLES}/{record_name(slot, uuid.uuid4().hex[:12])}", json_bytes(body))


async def read_record(store: Store, name: str, url: str) -> dict[str, Any]:
    """A record's content; :class:`CorruptStoreError` when it is gone or damaged."""
    data = await get_bytes(store, f"{SAMPLES}/{name}")
    if data is None:
        raise CorruptStoreError(
            f"{url}: the record {SAMPLES}/{name} is gone: the sample was removed or is being rewritten "
            "since the store was opened; open it again"
        )
    try:
        body = json.loads(data)
        _nbytes(body), str(body["id"]), str(body["prompt"])
        if slot_of(name) != body["slot"]:
            raise ValueError(f"it names slot {body['slot']}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptStoreError(f"{url}: the record {SAMPLES}/{name} is damaged ({exc})") from exc
    return body


async def old_records(store: Store, slots: list[int]) -> list[str]:
    """Keys of the records of ``slots`` (normally none): one listing per folder of records."""
    wanted = set(slots)
    folders = sorted({slot // BLOCK for slot in wanted})
    listed = await asyncio.gather(*(list_names(store, f"{SAMPLES}/{f}") for f in folders))
    return [
        f"{SAMPLES}/{f}/{n}"
        for f, names in zip(folders, listed, strict=True)
        for n in names
        if n.endswith(".json") and slot_of(n) in wanted
    ]


async def _all_names(store: Store) -> list[str]:
    folders = await list_names(store, SAMPLES)
    listed = await asyncio.gather(*(list_names(store, f"{SAMPLES}/{f}") for f in folders))
    return [
        f"{f}/{n}" for f, names in zip(folders, listed, strict=True) for n in names if n.endswith(".json")
    ]


def load_records(store: Store, url: str) -> Records:
    """Every complete sample, from the index and the record folders; damaged records reported, not raised."""
    return sync(_load(store, url))


async def _load(store: Store, url: str) -> Records:
    names, index_data, lease_names = await asyncio.gather(
        _all_names(store), get_bytes(store, INDEX), list_names(store, LEASES)
    )
    index = _read_index(index_data)
    listed = set(names)
    columns: dict[str, np.ndarray] = {"names": np.zeros(0, object), "ids": np.zeros(0, object)}
    columns.update(prompts=np.zeros(0, object), slots=np.zeros(0, np.int64))
    nbytes: dict[str, np.ndarray] = {}
    if index is not None:
        # an entry whose record is gone is stale: its sample was removed or is being rewritten
        keep = np.fromiter((n in listed for n in index["names"]), dtype=bool, count=len(index["names"]))
        for column in ("names", "ids", "prompts"):
            columns[column] = np.array(index[column], dtype=object)[keep]
        columns["slots"] = np.array(index["slots"], dtype=np.int64)[keep]
        nbytes = {a: np.array(v, dtype=np.int64)[keep] for a, v in index["nbytes"].items()}
    damaged: dict[int, str] = {}
    fresh: list[tuple[str, dict[str, Any]]] = []
    unread = sorted(listed.difference(columns["names"].tolist()))
    for start in range(0, len(unread), _BATCH):
        batch = unread[start : start + _BATCH]
        bodies = await asyncio.gather(*(read_record(store, n, url) for n in batch), return_exceptions=True)
        for name, body in zip(batch, bodies, strict=True):
            if isinstance(body, CorruptStoreError):
                damaged[slot_of(name)] = str(body).removeprefix(f"{url}: ")
            elif isinstance(body, BaseException):
                raise body
            else:
                fresh.append((name, body))
    if fresh:
        n_old = len(columns["names"])
        added = {
            "names": [n for n, _ in fresh],
            "ids": [str(b["id"]) for _, b in fresh],
            "prompts": [str(b["prompt"]) for _, b in fresh],
        }
        for column, values in added.items():
            columns[column] = np.concatenate([columns[column], np.array(values, dtype=object)])
        columns["slots"] = np.concatenate([columns["slots"], [int(b["slot"]) for _, b in fresh]]).astype(
            np.int64
        )
        sizes = [_nbytes(b) for _, b in fresh]
        for array in {a for s in sizes for a in s} | set(nbytes):
            old = nbytes.get(array, np.zeros(n_old, dtype=np.int64))
            nbytes[array] = np.concatenate([old, np.array([s.get(array, 0) for s in sizes], dtype=np.int64)])
    order = np.argsort(columns["slots"], kind="stable")
    slots = columns["slots"][order]
    for slot in np.unique(slots[1:][np.diff(slots) == 0]).tolist():
        found = columns["names"][columns["slots"] == slot].tolist()
        damaged[slot] = f"slot {slot} holds {len(found)} records ({', '.join(found)}): written twice at once"
    if damaged:
        order = order[~np.isin(slots, list(damaged))]
    leases = await asyncio.gather(*(get_bytes(store, f"{LEASES}/{n}") for n in lease_names))
    return Records(
        names=columns["names"][order].tolist(),
        slots=columns["slots"][order],
        ids=columns["ids"][order].tolist(),
        prompts=columns["prompts"][order].tolist(),
        nbytes={a: v[order] for a, v in nbytes.items()},
        damaged=damaged,
        leased={
            int(n): _lease_body(d) for n, d in zip(lease_names, leases, strict=True) if n.isdigit() and d
        },
        index_damaged=index_data is not None and index is None,
    )


def write_index(store: Store, records: Records) -> None:
    """Consolidate the records: one object that :func:`load_records` reads instead of each record."""
    body = json_bytes(
        {
            "names": records.names,
            "slots": records.slots.tolist(),
            "ids": records.ids,
            "prompts": records.prompts,
            "nbytes": {a: v.tolist() for a, v in sorted(records.nbytes.items())},
        }
    )
    sync(put_bytes(store, INDEX, body + b"\n" + str(crc32c(body)).encode()))


def _read_index(data: bytes | None) -> dict[str, Any] | None:
    """The index's columns; ``None`` when it is missing or damaged."""
    if data is None:
        return None
    body, _, check = data.rpartition(b"\n")
    try:
        if int(check) != crc32c(body):
            return None
        index = json.loads(body)
        n = len(index["names"])
        columns = [index[c] for c in ("slots", "ids", "prompts")] + list(index["nbytes"].values())
        if any(len(c) != n for c in columns):
            return None
        return index
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# -- leases -----------------------------------------------------------------------------------


def _lease_body(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {}


async def take_lease(store: Store, url: str, slot: int, sample_id: str, token: str) -> None:
    """Mark ``slot`` as being written by this writer; :class:`StoreError` while another one writes it."""
    key = f"{LEASES}/{slot}"
    mine = {
        "writer": token,
        "id": sample_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.time(),
    }
    for _ in range(3):
        if await create_once(store, key, json_bytes(mine)):
            return
        held = await get_bytes(store, key)
        if held is None:
            continue  # released meanwhile
        other = _lease_body(held)
        if other.get("writer") == token:
            return
        if not _dead(other):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other.get("since", 0)))
            raise StoreError(
                f"sample {sample_id!r} of {url} (slot {slot}) is being written by another writer (host "
                f"{other.get('host', '?')}, process {other.get('pid', '?')}, since {since}); nothing was "
                "written. "
                f"If that writer died, delete {key} in the store and run again"
            )
        await delete_keys(store, [key])  # its writer died on this host: take the slot over
    raise StoreError(f"{url}: cannot take the lease {key} of sample {sample_id!r}; run again")


def _dead(lease: Mapping[str, Any]) -> bool:
    """Whether a lease's writer is known to be gone: a process of this host that no longer runs."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    if lease["pid"] == os.getpid():
        return lease.get("writer") not in LIVE_WRITERS  # a writer of this process, gone without releasing it
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


async def drop_lease(store: Store, slot: int) -> None:
    await delete_keys(store, [f"{LEASES}/{slot}"])
