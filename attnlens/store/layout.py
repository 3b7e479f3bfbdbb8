"""How a store lays out its arrays: chunk and shard shapes, codecs and the storage dtype.

Chosen by measurement (``benchmarks/store_throughput.py``, results in ``BENCHMARKS.md``): zarr
pays a fixed cost for every chunk it writes, so that chunks of a few MiB write several times
slower than ``numpy.save`` of the same bytes, while chunks of tens of MiB write at its speed.
Two layouts:

- ``"chunks"`` (local disks): chunks of one sample, as many leading steps, layers, heads and
  queries as fit in 32 MiB, no shards. Reading one layer reads its chunk whole.
- ``"shards"`` (object stores, where each object costs a request): inner chunks of one
  ``(sample, step, layer)`` (split along heads and queries to at most 8 MiB), each with its
  crc32c, packed into shards laid out like the chunks above; reading one layer reads its inner
  chunks only. zarr encodes shards slower than it writes plain chunks (measured), on the
  writer's thread, never the forward's.

Every block divides the array's dimensions, so that no chunk is padded at an edge and a sample
takes exactly its array bytes on disk, which :func:`attnlens.store.plan` relies on.
Chunk keys use ``.`` separators (``cross/c.5.0.0.0.0.0``): one folder per array, not one per
chunk coordinate, which on a local disk costs a third of the durable write time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ..errors import StoreError, choices

__all__ = [
    "COMPRESSIONS",
    "LAYOUTS",
    "PROBABILITIES",
    "STORAGE_DTYPES",
    "blocks",
    "chunking",
    "compressors",
    "decode",
    "encode",
]

LAYOUTS = ("auto", "chunks", "shards")
COMPRESSIONS = (None, "zstd", "lz4")
STORAGE_DTYPES = (None, "float16", "bfloat16")
#: variables of attention probabilities, which a storage dtype applies to (``hidden_norm`` keeps its own)
PROBABILITIES = ("cross", "text_to_image", "key_mass", "full")

CHUNK_BYTES = 32 * 2**20  # a chunk (or a shard) of the "chunks" ("shards") layout holds at most this
INNER_BYTES = 8 * 2**20  # an inner chunk of the "shards" layout holds at most this
KEY_ENCODING = {"name": "default", "configuration": {"separator": "."}}
#: array attribute naming a storage dtype numpy cannot hold (bfloat16, kept as its upper 16 bits)
STORAGE_ATTR = "attnlens_storage"


def check_option(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise StoreError(f"unknown {name} {value!r}: choose from {choices(allowed)}")


def blocks(shape: Sequence[int], itemsize: int, limit: int, first: int = 1) -> tuple[int, ...]:
    """The largest block of one sample whose leading dims are split first, by divisors, to fit ``limit``.

    ``shape`` is ``(sample, ...)``; dims before ``first`` are kept at 1.

    >>> blocks((10, 28, 57, 1, 4096, 512), 2, 32 * 2**20)  # FLUX head-mean cross in fp16
    (1, 1, 3, 1, 4096, 512)
    >>> blocks((10, 4, 4, 1, 256), 4, 32 * 2**20)  # small: the whole sample
    (1, 4, 4, 1, 256)
    >>> blocks((10, 28, 57, 24, 4608, 4608), 2, 32 * 2**20)  # full: a part of one head's rows
    (1, 1, 1, 1, 2304, 4608)
    """
    block = [1] * first + [max(1, s) for s in shape[first:]]
    for axis in range(first, len(block)):
        if math.prod(block) * itemsize <= limit:
            break
        rest = math.prod(block[axis + 1 :]) * itemsize
        fitting = [d for d in _divisors(block[axis]) if d * rest <= limit]
        block[axis] = max(fitting, default=1)
    return tuple(block)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def chunking(
    shape: Sequence[int], itemsize: int, layout: str, name: str = ""
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Chunk and shard shapes of a data variable ``name`` of ``shape`` ``(sample, step, layer, ...)``.

    ``full`` is chunked by one step and layer at most, so that streaming it region by region
    (:meth:`attnlens.store.StoreWriter.stream`) fills whole chunks.

    >>> chunking((10, 28, 57, 1, 4096, 512), 2, "chunks")
    ((1, 1, 3, 1, 4096, 512), None)
    >>> chunking((10, 28, 57, 1, 4096, 512), 2, "shards")  # inner chunks of one step and layer
    ((1, 1, 1, 1, 4096, 512), (1, 1, 3, 1, 4096, 512))
    >>> chunking((10, 4, 4, 1, 256), 4, "shards")  # a shard of one chunk is a chunk
    ((1, 1, 1, 1, 256), (1, 4, 4, 1, 256))
    >>> chunking((10, 4, 4, 2, 64, 64), 4, "chunks", "full")
    ((1, 1, 1, 2, 64, 64), None)
    """
    outer = blocks(shape, itemsize, CHUNK_BYTES, first=3 if name == "full" else 1)
    if layout == "chunks":
        return outer, None
    inner = blocks(outer, itemsize, INNER_BYTES, first=3)
    return inner, outer


def compressors(compression: str | None, level: int, *, sharded: bool) -> list:
    """The bytes-to-bytes codecs of a data variable (of each inner chunk when ``sharded``)."""
    if compression == "zstd":
        return [ZstdCodec(level=level, checksum=True)]
    if compression == "lz4":
        return [BloscCodec(cname="lz4", clevel=level, shuffle="shuffle")]
    # plain chunks are checked against the crc32c each sample's record holds; an inner chunk of a
    # shard is read by byte range, so it carries its own
    return [Crc32cCodec()] if sharded else []


def storage_dtype(name: str, dtype: np.dtype, storage: str | None) -> np.dtype:
    """The dtype ``name`` is kept in on disk."""
    if storage is None or name not in PROBABILITIES or dtype.kind != "f":
        return dtype
    return np.dtype(np.float16) if storage == "float16" else np.dtype(np.uint16)


def encode(values: np.ndarray, storage: str | None) -> np.ndarray:
    """Probabilities as stored: float16, or bfloat16 as its 16 bits (torch rounds, to nearest even).

    >>> x = np.array([0.5, 1 / 3, 1e-30, np.nan], dtype=np.float32)
    >>> back = decode(encode(x, "bfloat16"), "bfloat16")  # 8 significant bits, float32's range
    >>> back[:2].tolist(), float(abs(back[2] / x[2] - 1)) <= 2**-8, bool(np.isnan(back[3]))
    ([0.5, 0.333984375], True, True)
    """
    import torch  # converts about twice as fast as numpy, and knows bfloat16

    tensor = torch.from_numpy(np.ascontiguousarray(values))
    if storage == "float16":
        return tensor.to(torch.float16).numpy()
    return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def decode(values: np.ndarray, storage: str | None) -> np.ndarray:
    """Stored values as read: bfloat16 bits become float32 (exactly), anything else is returned as is."""
    if storage != "bfloat16":
        return values
    return (values.astype(np.uint32) << 16).view(np.float32)
