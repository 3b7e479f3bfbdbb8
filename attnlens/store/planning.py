"""How many bytes a capture will write to a store, known before anything runs.

The array bytes of every variable follow from the capture's spec and the model's token counts
(:meth:`~attnlens.models.base.ModelAdapter.token_counts`, from the adapter's geometry); chunks are never
padded (:mod:`.layout`) and uncompressed by default, so these are exact. What else a store
holds is small and estimated: the token labels of each sample (variable-length strings), its
record, and the metadata and coordinates written once (measured on an empty in-memory store
laid out like the real one).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from ..errors import InputError, StoreFullError, UnsupportedModelError, choices
from . import layout as lay
from .location import StoreLike, free_bytes, resolve

__all__ = ["Plan", "format_bytes", "plan"]

_STRING = 9  # bytes of one short variable-length string in zarr's vlen-utf8 encoding (4-byte length + text)
_RECORD = 160  # a sample record without its chunk list (id, prompt, slot, time)
_ENTRY = 30  # a chunk's entry in a record, besides its key (size, crc32c, punctuation)
_SLOT = 100  # a sample's share of the index, its slot claim and id binding
_ROOT = 2500  # root metadata: versions, capture attributes, digests


@dataclass(frozen=True)
class Plan:
    """What a capture will write to a store: array shapes and bytes, per sample and per run.

    Attributes:
        model: the model's class (or zoo name).
        text_tokens: text tokens of each forward.
        image_tokens: image (video) tokens of each forward.
        samples: samples in the run.
        variables: each kept variable's per-sample ``{dim: size}`` and stored dtype.
        per_sample: bytes each sample writes: each variable, ``"token labels"`` and ``"record"``.
        fixed: bytes written once per store (metadata, coordinates, index).
        notes: where the estimate is an upper bound, and why.
    """

    model: str
    text_tokens: int
    image_tokens: int
    samples: int
    variables: dict[str, tuple[dict[str, int], str]]
    per_sample: dict[str, int]
    fixed: int
    notes: tuple[str, ...] = field(default=())

    @property
    def sample_bytes(self) -> int:
        """Bytes one sample writes."""
        return sum(self.per_sample.values())

    @property
    def total(self) -> int:
        """Bytes the whole run writes."""
        return self.fixed + self.samples * self.sample_bytes

    def check(self, location: StoreLike, *, storage_options: dict[str, Any] | None = None) -> None:
        """Raise :class:`~attnlens.errors.StoreFullError` unless the run fits the free space at ``location``.

        Only local disks tell their free space; elsewhere nothing is checked.
        """
        store, url = resolve(location, storage_options, read_only=False)
        free = free_bytes(store)
        if free is not None and self.total > free:
            import errno

            raise StoreFullError(
                errno.ENOSPC,
                f"this capture writes {format_bytes(self.total)} ({self.samples} sample(s) of "
                f"{format_bytes(self.sample_bytes)}) "
                f"to {url}, but its disk has {format_bytes(free)} free: keep less, or write elsewhere",
            )

    def __str__(self) -> str:
        labels = self.per_sample["token labels"] + self.per_sample["record"]
        lines = [
            f"{self.model}: {self.text_tokens} text + {self.image_tokens} image tokens per forward",
            *(
                f"  {name:<14} {' × '.join(f'{d} {n}' for d, n in sizes.items())}  {dtype}  "
                f"{format_bytes(self.per_sample[name])} per sample"
                for name, (sizes, dtype) in self.variables.items()
            ),
            f"  token labels, record: {format_bytes(labels)} per sample",
            f"per sample {format_bytes(self.sample_bytes)}; {self.samples} sample(s): "
            f"{format_bytes(self.total)}",
            *self.notes,
        ]
        return "\n".join(lines)


def plan(
    model: Any,
    spec: Any = None,
    *,
    steps: int,
    text_tokens: int,
    height: int | None = None,
    width: int | None = None,
    frames: int = 1,
    guidance: int = 1,
    samples: int = 1,
    image_tokens: int | None = None,
    layout: str = "chunks",
    compression: str | None = None,
    storage_dtype: str | None = None,
    **spec_fields: Any,
) -> Plan:
    """The bytes a capture of ``model`` will write to a store, before it runs.

    Args:
        model: a pipeline (its weights are not touched), the name of an embedded model, or a
            local diffusers folder: a pipeline's (built from its configs on the ``meta`` device),
            or a transformer's, which like a bare transformer needs ``image_tokens``.
        spec: a :class:`~attnlens.CaptureSpec`; or give its fields as keywords instead.
        steps: denoising steps of each sample.
        text_tokens: the prompt's tokens as encoded (e.g. FLUX's ``max_sequence_length``; SD3:
            the T5 part, after CLIP's 77).
        height: pixels of each image (video frame), top to bottom.
        width: pixels of each image (video frame), left to right.
        frames: frames of each video.
        guidance: forwards per step: 2 when classifier-free guidance runs both branches.
        samples: samples in the run.
        image_tokens: image (video) tokens per forward, instead of ``height``/``width``.
        layout: the :class:`~attnlens.store.StoreWriter`'s layout (``"chunks"`` or ``"shards"``).
        compression: its compression (sizes become upper bounds).
        storage_dtype: its storage dtype of probabilities.

    >>> from attnlens.testing import tiny_flux_pipeline
    >>> pipe = tiny_flux_pipeline()  # its VAE: 2 pixels per latent cell, 4 per token
    >>> p = plan(pipe, keep="cross", heads="mean", height=16, width=24, steps=4, text_tokens=8, samples=10)
    >>> p.image_tokens, p.variables["cross"]
    (24, ({'step': 4, 'layer': 2, 'head': 1, 'query': 24, 'key_text': 8}, 'float32'))
    >>> p.per_sample["cross"]  # 4 × 2 × 1 × 24 × 8 float32 values
    6144
    """
    import attnlens

    lay.check_option("layout", layout, lay.LAYOUTS[1:])
    lay.check_option("compression", compression, lay.COMPRESSIONS)
    lay.check_option("storage dtype", storage_dtype, lay.STORAGE_DTYPES)
    spec = spec if spec is not None else attnlens.CaptureSpec(**spec_fields)
    adapter, transformer, pipeline, name = _model(model)
    if image_tokens is None:
        if height is None or width is None:
            raise InputError(
                "give the height and width in pixels (--height, --width), or image_tokens (--image-tokens)"
            )
        n_text, n_image = _token_counts(adapter, pipeline, name, height, width, frames, text_tokens)
    else:
        n_text, n_image = text_tokens, image_tokens
    if n_image < 1 or n_text < 1:
        raise InputError(f"{height} × {width} px and {text_tokens} text tokens give {n_image} image tokens")
    every = adapter.layers(transformer)
    chosen = set(spec.select_layers([layer.name for layer in every]))
    layers = [layer for layer in every if layer.name in chosen]
    heads = max(len(spec.head_labels(layer.num_heads)) for layer in layers)
    notes = []
    if callable(spec.timesteps):
        notes.append("timesteps= is a predicate: every step is counted (an upper bound)")
        n_steps = steps
    elif spec.timesteps is not None:
        n_steps = len({int(t) for t in np.atleast_1d(spec.timesteps) if 0 <= int(t) < steps})
    else:
        n_steps = steps
    n_steps *= guidance
    seq = n_text + n_image
    dims = {
        "cross": {"query": n_image, "key_text": n_text},
        "text_to_image": {"query_text": n_text, "key_image": n_image},
        "key_mass": {"key": seq},
        "full": {"query_all": seq, "key": seq},
        "hidden_norm": {"key": seq},
    }
    captured = np.dtype(np.float16) if str(spec.dtype) == "torch.float16" else np.dtype(np.float32)
    variables: dict[str, tuple[dict[str, int], str]] = {}
    per_sample: dict[str, int] = {}
    for var in sorted(spec.keep):
        sizes = {"step": n_steps, "layer": len(layers)}
        if var != "hidden_norm":
            sizes["head"] = heads
        sizes.update(dims[var])
        stored = lay.storage_dtype(var, captured, storage_dtype)
        variables[var] = (sizes, "bfloat16" if stored == np.uint16 else str(stored))
    if compression is not None:
        notes.append(f"{compression} compresses attention probabilities little: the sizes are upper bounds")
    layer_names = [layer.name for layer in layers]
    head_labels = spec.head_labels(layers[0].num_heads)
    arrays, fixed = _skeleton(
        variables,
        n_steps,
        layer_names,
        [lay_.kind for lay_ in layers],
        head_labels,
        n_text,
        n_image,
        layout,
        compression,
        storage_dtype,
    )
    chunk_keys = 0
    for var, (sizes, stored) in variables.items():
        shape = (1, *sizes.values())
        itemsize = 2 if stored == "bfloat16" else np.dtype(stored).itemsize
        per_sample[var] = math.prod(shape) * itemsize + _overhead(arrays[var])
        chunk_keys += _keys_per_sample(arrays[var])
    per_sample["token labels"] = 3 * (4 + _STRING * n_text) + 8 * n_text + 4 + _STRING * seq
    chunk_keys += 5
    per_sample["record"] = _RECORD + chunk_keys * (_ENTRY + 24) + _SLOT
    return Plan(name, n_text, n_image, samples, variables, per_sample, fixed, tuple(notes))


def _model(model: Any) -> tuple[Any, Any, Any, str]:
    """``(adapter, transformer, pipeline, name)`` of a model object, zoo name or diffusers folder."""
    from ..models.registry import resolve as resolve_model

    if isinstance(model, str | os.PathLike):
        from .. import zoo

        text = os.fspath(model)
        if text in zoo.available():
            adapter, transformer, pipeline = resolve_model(zoo.load(text))
            return adapter, transformer, pipeline, text
        adapter, transformer, pipeline = resolve_model(_from_folder(text))
        return adapter, transformer, pipeline, type(transformer).__name__
    adapter, transformer, pipeline = resolve_model(model)
    return adapter, transformer, pipeline, type(transformer).__name__


def _token_counts(
    adapter: Any, pipeline: Any, name: str, height: int, width: int, frames: int, text: int
) -> tuple[int, int]:
    """The adapter's token counts for ``pipeline``; its VAE and patches say how pixels become tokens."""
    from ..zoo.shapes import ShapesPipeline

    if isinstance(pipeline, ShapesPipeline):  # attnlens' embedded models patch pixels: no VAE
        side = pipeline.config.patch
        return text, (height // side) * (width // side)
    if pipeline is None:
        raise UnsupportedModelError(
            f"a bare {name} does not say how pixels become tokens (its pipeline's VAE does): give the "
            "pipeline, the pipeline's folder, or plan(image_tokens=...)"
        )
    try:
        return adapter.token_counts(pipeline, height=height, width=width, frames=frames, text=text)
    except (AttributeError, UnsupportedModelError) as exc:
        raise UnsupportedModelError(
            f"{name}: cannot tell how pixels become tokens ({exc}); give plan(image_tokens=...)"
        ) from exc


def _from_folder(folder: str) -> Any:
    """A diffusers folder's pipeline (or transformer), built from its configs on the ``meta`` device:
    no weights are read; the pipeline class itself derives its VAE's scale factors."""
    import diffusers
    import torch

    def config(path: str) -> dict[str, Any] | None:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def meta(cls_name: str, path: str) -> Any:
        found, cls = config(os.path.join(path, "config.json")), getattr(diffusers, str(cls_name), None)
        if found is None or cls is None:
            return None
        with torch.device("meta"):
            return cls.from_config(found)

    index = config(os.path.join(folder, "model_index.json"))
    if index is None:
        transformer = meta((config(os.path.join(folder, "config.json")) or {}).get("_class_name"), folder)
        if transformer is None:
            raise UnsupportedModelError(
                f"{folder} holds no diffusers pipeline (model_index.json) or transformer (config.json with a "
                f"_class_name diffusers knows); give an embedded model ({choices(_zoo())}) or a model object"
            )
        return transformer
    parts = {}
    for part, spec in index.items():
        if part.startswith("_") or not isinstance(spec, list) or None in spec:
            continue
        if part.startswith("scheduler"):
            parts[part] = getattr(diffusers, spec[1]).from_pretrained(os.path.join(folder, part))
        else:  # text encoders and tokenizers are not needed to count tokens
            parts[part] = meta(spec[1], os.path.join(folder, part)) if spec[0] == "diffusers" else None
    return getattr(diffusers, index["_class_name"])(**parts)


def _zoo() -> list[str]:
    from .. import zoo

    return zoo.available()


def _skeleton(
    variables: dict[str, tuple[dict[str, int], str]],
    n_steps: int,
    layers: Sequence[str],
    kinds: Sequence[str],
    heads: Sequence[Any],
    n_text: int,
    n_image: int,
    layout: str,
    compression: str | None,
    storage_dtype: str | None,
) -> tuple[dict[str, zarr.Array], int]:
    """The store's arrays created empty in memory, as its writer makes them; and the bytes written once."""
    from .writer import StoreWriter

    objects: dict[str, Any] = {}
    writer = StoreWriter(
        zarr.storage.MemoryStore(objects), layout=layout, compression=compression, storage_dtype=storage_dtype
    )
    group = zarr.open_group(writer._store, mode="a", zarr_format=3)
    arrays = {}
    for var, (sizes, stored) in variables.items():
        np_dtype = np.float32 if stored == "bfloat16" else np.dtype(stored)
        arrays[var] = writer._create(
            group, var, shape=(64, *sizes.values()), dtype=np_dtype, dims=("sample", *sizes), data=True
        )
    seq = n_text + n_image
    coords: dict[str, tuple[tuple[str, ...], tuple[int, ...], Any, int]] = {  # dims, shape, dtype, data bytes
        "step": (("step",), (n_steps,), np.int64, 8 * n_steps),
        "denoise_step": (("step",), (n_steps,), np.int64, 8 * n_steps),
        "timestep": (("step",), (n_steps,), np.float64, 8 * n_steps),
        "branch": (("step",), (n_steps,), object, 4 + 10 * n_steps),
        "transformer": (("step",), (n_steps,), object, 4 + 15 * n_steps),
        "layer": (("layer",), (len(layers),), object, 4 + sum(4 + len(n) for n in layers)),
        "layer_kind": (("layer",), (len(layers),), object, 4 + sum(4 + len(k) for k in kinds)),
        "head": (
            ("head",),
            (len(heads),),
            object if isinstance(heads[0], str) else np.int64,
            8 + 8 * len(heads),
        ),
        "query": (("query",), (n_image,), np.int64, 8 * n_image),
        "frame": (("query",), (n_image,), np.int64, 8 * n_image),
        "y": (("query",), (n_image,), np.int64, 8 * n_image),
        "x": (("query",), (n_image,), np.int64, 8 * n_image),
        "key_text": (("key_text",), (n_text,), np.int64, 8 * n_text),
        "key": (("key",), (seq,), np.int64, 8 * seq),
        "token_str": (("sample", "key_text"), (64, n_text), object, 0),
        "word": (("sample", "key_text"), (64, n_text), object, 0),
        "word_index": (("sample", "key_text"), (64, n_text), np.int64, 0),
        "token_kind": (("sample", "key_text"), (64, n_text), object, 0),
        "key_kind": (("sample", "key"), (64, seq), object, 0),
    }
    if "text_to_image" in variables:
        coords["query_text"] = (("query_text",), (n_text,), np.int64, 8 * n_text)
        coords["key_image"] = (("key_image",), (n_image,), np.int64, 8 * n_image)
    if "full" in variables:
        coords["query_all"] = (("query_all",), (seq,), np.int64, 8 * seq)
    written = 0
    for name, (dims, shape, np_dtype, nbytes) in coords.items():
        chunks = (1, *shape[1:]) if dims[0] == "sample" else None
        writer._create(group, name, shape=shape, dtype=np_dtype, dims=dims, data=False, chunks=chunks)
        written += nbytes
    metadata = sum(len(v.to_bytes()) for k, v in objects.items() if k.endswith("zarr.json"))
    return arrays, metadata + written + _ROOT + 70 * (len(arrays) + len(coords))


def _keys_per_sample(array: zarr.Array) -> int:
    grid = array.metadata.chunk_grid.chunk_shape
    return math.prod(math.ceil(s / b) for s, b in zip(array.shape[1:], grid[1:], strict=True))


def _overhead(array: zarr.Array) -> int:
    """Bytes a sample's chunks take besides its values: shard indexes and inner checksums."""
    if array.shards is None:
        return 0
    inner = math.prod(math.ceil(s / c) for s, c in zip(array.shape[1:], array.chunks[1:], strict=True))
    return inner * (16 + 4) + _keys_per_sample(array) * 4


def format_bytes(n: float) -> str:
    """``n`` bytes for people: ``'1.5 GiB'``.

    >>> format_bytes(1536), format_bytes(3 * 2**30)
    ('1.5 KiB', '3.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""
