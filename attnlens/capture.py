"""``attnlens.capture``: record attention during ordinary forward passes.

>>> import attnlens
>>> from attnlens.testing import tiny_flux_transformer, flux_inputs
>>> model = tiny_flux_transformer()
>>> with attnlens.capture(model, keep=("cross", "key_mass"), heads="mean") as cap:
...     _ = model(**flux_inputs(model, height=4, width=6))
>>> cap.result.cross.dims
('sample', 'step', 'layer', 'head', 'query', 'key_text')
>>> cap.result.sizes["query"], cap.result.sizes["head"]
(24, 1)
>>> cap.result.attrs["capture_paths"]["lse"]
['kernel:flash_attention_for_cpu']
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from .errors import EmptySpecError, HookError, LayoutError, StoreError
from .grouping import Run
from .hooks import HookRegistry
from .interventions import Intervener, Intervention
from .models.base import AttentionLayer
from .models.registry import resolve
from .recorder import Recorder
from .schema import CapturedStep
from .spec import CaptureSpec
from .text import TokenLabels

__all__ = ["Capture", "capture"]


def capture(
    model: Any,
    spec: CaptureSpec | None = None,
    *,
    labels: Sequence[TokenLabels] | None = None,
    store: Any = None,
    sample_ids: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    intervene: Intervention | None = None,
    **spec_fields: Any,
) -> Capture:
    """Capture attention from a diffusers pipeline or transformer during ordinary forwards.

    Use as a context manager: hooks attach on entry and detach on exit, also when the
    body raises. The model's outputs are unchanged, bit for bit, unless ``intervene`` changes
    its attention: attnlens runs each attention call through the kernel SDPA itself would
    run, which also returns the row normaliser the kept probabilities need (see
    :mod:`attnlens.kernels` and :mod:`attnlens.probs`).

    Args:
        model: a supported pipeline (e.g. ``FluxPipeline``) or transformer
            (e.g. ``FluxTransformer2DModel``); see :func:`attnlens.supported_models`.
        spec: a :class:`CaptureSpec`; or give its fields as keywords instead.
        labels: token labels per sample (or one for all) when calling a bare transformer;
            pipelines are labelled from their own tokenizer.
        store: a path, fsspec URL or zarr store to stream each finished sample to (see
            :mod:`attnlens.store`), or a :class:`~attnlens.store.StoreWriter` configured by
            hand. What is written leaves memory: a capture of any number of samples holds
            about one, and ``cap.result`` reads the store back after the block. ``full`` is
            streamed as it is computed, never held for a whole sample, and not limited by
            ``max_full_bytes``; the store's samples share one step count, set by its first
            sample group (another count raises :class:`~attnlens.errors.LayoutError`).
        sample_ids: every sample id the store will hold, the same list in every process that
            writes to it (e.g. each ``torchrun`` rank); capture each inside
            ``with cap.sample(id):`` and resume with ``cap.pending()``. ``None``: the store
            grows with each finished sample.
        storage_options: passed to fsspec for a store URL.
        intervene: :func:`attnlens.suppress` or :func:`attnlens.redirect`: the model attends
            with the selected keys' attention removed or moved, in every forward while the
            capture is attached (captured steps or not), and what is kept is that attention;
            outputs change, by design (see :mod:`attnlens.interventions`).
        **spec_fields: the fields of a :class:`CaptureSpec` (``layers``, ``heads``,
            ``timesteps``, ``keep``, ``dtype``, ``device``, ``chunk_bytes``, ``max_full_bytes``).

    Returns:
        a :class:`Capture`; after the block, ``cap.result`` is an ``xarray.Dataset``.

    Forwards are grouped into samples automatically (:mod:`attnlens.grouping`): a forward
    starts a new sample when its timestep moves against the sampler's direction (a sampler
    restarted), when the same timestep and branch come again (repeated bare calls), or when
    the batch or token layout changes; :meth:`Capture.next_sample` forces one. Each row of a
    batch is a sample.
    """
    if spec is None:
        spec = CaptureSpec(**spec_fields)
    elif spec_fields:
        raise TypeError("give either a CaptureSpec or its fields as keywords, not both")
    return Capture(
        model,
        spec,
        labels=labels,
        store=store,
        sample_ids=sample_ids,
        storage_options=storage_options,
        intervene=intervene,
    )


class Capture:
    """A capture of one model; made by :func:`capture`, used as a context manager.

    Attributes:
        spec: what is kept.
        layers: the captured :class:`~attnlens.models.AttentionLayer` objects.
    """

    def __init__(
        self,
        model: Any,
        spec: CaptureSpec,
        *,
        labels: Sequence[TokenLabels] | None = None,
        store: Any = None,
        sample_ids: Sequence[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        intervene: Intervention | None = None,
    ) -> None:
        adapter, transformer, pipeline = resolve(model)
        self.spec = spec
        refused = [k for k in spec.keep if k in adapter.unsupported_keeps]
        if refused:
            raise EmptySpecError(
                f"the {adapter.family} adapter cannot keep {refused}; "
                f"choose from {[k for k in spec.keep if k not in refused] or 'cross, key_mass'}"
            )
        every = adapter.layers(transformer)
        chosen = set(spec.select_layers([layer.name for layer in every]))
        self.layers: list[AttentionLayer] = [layer for layer in every if layer.name in chosen]
        for n in {layer.num_heads for layer in self.layers}:
            spec.select_heads(n)  # raises early on a bad head index
        self._writer = None
        self._location = store
        self._storage_options = storage_options
        self._declared = sample_ids is not None
        if store is not None:
            from .store import StoreWriter

            if isinstance(store, StoreWriter):  # a writer configured by hand (compression, queue size)
                if sample_ids is not None or storage_options is not None:
                    raise TypeError("give sample_ids and storage_options to the StoreWriter itself")
                self._writer, self._location = store, store.store
            else:
                self._writer = StoreWriter(store, sample_ids=sample_ids, storage_options=storage_options)
        elif sample_ids is not None:
            raise TypeError("sample_ids name the samples of a store: give store= as well")
        intervener = None
        hooked = self.layers
        if intervene is not None:
            acted = set(intervene.select_layers([layer.name for layer in every]))
            intervener = Intervener(intervene, acted)
            hooked = [layer for layer in every if layer.name in acted or layer.name in chosen]
        # pipelines that switch transformers between steps (Wan 2.2) hook each one; layers share names
        members = adapter.transformers(transformer, pipeline)
        streaming = self._writer is not None and "full" in spec.keep
        self._recorder = (_StreamingRecorder if streaming else Recorder)(
            adapter,
            transformer,
            pipeline,
            spec,
            self.layers,
            labels=labels,
            intervener=intervener,
            members=dict(members),
            new_run=self._new_run if self._writer is not None else None,
        )
        if isinstance(self._recorder, _StreamingRecorder):
            self._recorder.writer = self._writer
        hidden = "hidden_norm" in spec.keep
        self._registries = [
            HookRegistry(
                adapter, transformer, hooked, self._recorder, pipeline=pipeline, hidden_states=hidden
            )
        ] + [
            HookRegistry(
                adapter,
                module,
                _member_layers(adapter, module, name, hooked),
                self._recorder.member(name),
                hidden_states=hidden,
            )
            for name, module in members[1:]
        ]
        self._result: tuple[int, xr.Dataset] | None = None

    # -- context management ----------------------------------------------------------------

    def __enter__(self) -> Capture:
        try:
            for registry in self._registries:
                registry.attach()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for registry in self._registries:
            registry.detach()
        self._recorder.reset()
        if self._writer is not None:
            finished = bool(exc) and exc[0] is None  # after an exception the last sample is unfinished
            try:
                if finished and self._recorder.grouping.runs:
                    self._store(self._recorder.grouping.runs[-1])
            finally:
                self._writer.close(raise_errors=finished)

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return self._registries[0].attached

    def next_sample(self) -> None:
        """Start a new sample at the next forward, even if its timestep would continue a run."""
        self._recorder.grouping.next_sample()

    @contextlib.contextmanager
    def sample(self, *ids: str) -> Iterator[None]:
        """Name the samples that the forwards inside the block capture, one id per batch row.

        The forwards inside form one sample group (a new one starts on entry). With a store,
        the group is written when the block ends without an exception; a sample whose id the
        store already holds is overwritten. A store with declared ``sample_ids`` takes samples
        only through this block.

        >>> import attnlens
        >>> from attnlens.testing import tiny_flux_transformer, flux_inputs
        >>> model = tiny_flux_transformer()
        >>> with attnlens.capture(model, keep="key_mass", store="memory://doc/ids.zarr") as cap:
        ...     with cap.sample("cat", "dog"):
        ...         _ = model(**flux_inputs(model, batch=2))
        >>> list(cap.result.sample_id.values)
        ['cat', 'dog']
        """
        names = [str(i) for i in ids]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"give one distinct id per sample of the batch; got {names}")
        recorder = self._recorder
        if recorder.open_ids is not None:
            raise HookError("`with cap.sample(...)` blocks cannot nest")
        if self._writer is not None:
            self._writer.check_ids(names)
        first = len(recorder.grouping.runs)
        recorder.open_ids = names
        recorder.grouping.next_sample()
        try:
            yield
        finally:
            recorder.open_ids = None
            recorder.grouping.next_sample()
        runs = [r for r in recorder.grouping.runs[first:] if r.steps or r.stored]
        if not runs:
            raise HookError(
                f"nothing was captured inside cap.sample{tuple(names)}: run the model inside the block "
                "(and let timesteps= select at least one of its steps)"
            )
        if len(runs) > 1 or runs[0].layout.batch != len(names):
            raise LayoutError(
                f"cap.sample{tuple(names)} names {len(names)} sample(s), but its forwards formed "
                f"{sum(r.layout.batch for r in runs)} (in {len(runs)} group(s): a sampler restarted, or the "
                "batch or tokens changed); give one id per batch row and one block per sampler run"
            )
        if self._writer is not None:
            self._submit(runs[0], names)

    def pending(self, ids: Sequence[str] | None = None) -> list[str]:
        """The ids among ``ids`` (default: the declared ``sample_ids``) that the store lacks, in order.

        Loop over them to resume an interrupted run: samples completed earlier, by this or
        another process, are skipped; a sample cut short by a crash is captured again.
        """
        if self._writer is None:
            raise StoreError("this capture writes no store: give store= to attnlens.capture")
        return self._writer.pending(ids)

    @property
    def result(self) -> xr.Dataset:
        """Everything captured, as an ``xarray.Dataset`` (see :mod:`attnlens.schema`).

        In memory; for a capture with ``store=``, the store read back (lazily, dask-backed)
        once the ``with`` block has closed it: every sample it holds, also those written
        before.
        """
        if self._writer is not None:
            if self.attached:
                raise HookError(
                    "a capture with store= writes its samples as they finish: read cap.result after the "
                    "`with` block, or open the store with attnlens.open_store"
                )
            from .store import open_store

            return open_store(self._location, storage_options=self._storage_options)
        version = self._recorder.version
        if self._result is None or self._result[0] != version:
            self._result = (version, self._recorder.dataset())
        return self._result[1]

    # -- the store ----------------------------------------------------------------------------

    def _new_run(self, previous: Run | None) -> None:
        """A run starts: stream the one before to the store (a declared store takes named samples only)."""
        if self._declared and self._recorder.open_ids is None:
            raise StoreError(
                f"{self._location} declares its sample_ids: capture each sample inside `with cap.sample(id):`"
            )
        if previous is not None:
            self._store(previous)

    def _store(self, run: Run) -> None:
        """Hand a finished run to the store, unless it is empty, stored or named (cap.sample stores those)."""
        if run.ids is None and not run.stored and run.steps:
            self._submit(run, None)

    def _submit(self, run: Run, ids: list[str] | None) -> None:
        """Queue ``run`` for the writer, which assembles its Dataset; the run's arrays leave the recorder."""
        assert self._writer is not None
        recorder = self._recorder
        streamed = isinstance(recorder, _StreamingRecorder) and recorder.close_streams(run)
        steps, run.steps, run.stored = run.steps, [], True
        copied = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            copied = torch.cuda.Event()  # the writer thread must not read host buffers still being filled
            copied.record()

        def build() -> xr.Dataset:
            if copied is not None:
                copied.synchronize()
            ds = recorder.dataset([Run(run.layout, run.labels, run.prompts, steps, paths=run.paths)])
            return ds.assign_coords(query_all=np.arange(run.layout.seq_len)) if streamed else ds

        self._writer.submit(ids, build)


def _member_layers(
    adapter: Any, module: Any, name: str, chosen: list[AttentionLayer]
) -> list[AttentionLayer]:
    """The layers of a further transformer that match the chosen layers of the first, by name."""
    found = {layer.name: layer for layer in adapter.layers(module)}
    missing = [layer.name for layer in chosen if layer.name not in found]
    if missing or any(found[layer.name].num_heads != layer.num_heads for layer in chosen):
        raise LayoutError(
            f"{name} lacks layers {missing} of the pipeline's transformer, or has other head counts; "
            "capture each transformer on its own"
        )
    return [found[layer.name] for layer in chosen]


# -- full, streamed to the store --------------------------------------------------------------


class _StreamingRecorder(Recorder):
    """A recorder whose ``full`` goes to the store as it is computed, never held whole.

    Each sample of a run gets its own :class:`~attnlens.store.SampleStream` at the run's first
    captured forward; each attention call's chunks of query rows are gathered into whole store
    chunks (:class:`_Bands`, one layer of one sample at one step) and queued to the writer.
    ``max_full_bytes`` does not apply: the disk is the limit, checked by the writer.

    The step count of a sample is known when its run ends, so ``full``'s ``step`` extent grows
    with the steps of the first sample group of a fresh store (a metadata-only resize: ``full``
    is chunked by one step); later samples must have as many steps as the store, or the capture
    raises :class:`~attnlens.errors.LayoutError` naming both counts (at the step past the
    store's, or when a shorter run ends) and the sample is discarded, nothing of it half-written.
    """

    writer: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams: dict[Run, list[Any]] = {}  # one stream per sample of a run
        self._targets: list[tuple[Any, int]] = []  # per row of the running forward: (stream, step)
        self._bands: dict[tuple[str, int], _Bands] = {}  # (layer, forward row) → its bands
        self._layer_index = {layer.name: i for i, layer in enumerate(self.layers)}

    def begin_forward(
        self, args: tuple, kwargs: dict[str, Any], branch: str, source: str = "transformer"
    ) -> bool:
        active = super().begin_forward(args, kwargs, branch, source)
        if self._steps:
            run = self.grouping.runs[-1]
            try:
                self._targets = self._place(run, self._steps)
            except BaseException:
                self._steps, self._layout = [], None
                run.steps, run.stored = [], True  # given up: never submitted
                for stream in self.streams.pop(run, []):
                    stream.discard()
                raise
        return active

    def end_forward(self) -> None:
        if self._steps and self._layout is not None:  # what no call wrote is NaN, as in memory
            heads, reduction = self.spec.select_heads(self.layers[0].num_heads)
            n_heads = 1 if reduction else len(heads) if heads is not None else self.layers[0].num_heads
            for layer in self.layers:
                for row in range(self._layout.batch):
                    self._bands_of(layer.name, row, n_heads, self._layout.seq_len, False).finish()
        self._bands, self._targets = {}, []
        super().end_forward()

    def reset(self) -> None:
        self._bands, self._targets = {}, []
        super().reset()

    def full_sink(
        self, layer: str, rows: torch.Tensor | None, shape: tuple[int, ...], device: Any, whole: bool
    ) -> _StoreSink:
        """The call's rows of ``full`` ``(forward batch, head, query_all, key)``, each to its sample."""
        batch_rows = range(shape[0]) if rows is None else [int(r) for r in rows]
        bands = [self._bands_of(layer, row, shape[1], shape[2], whole) for row in batch_rows]
        return _StoreSink(bands, self.spec.dtype)

    def close_streams(self, run: Run) -> bool:
        """Take ``run``'s streams for its submission (``False``: it has none); refuse a short run.

        Raises :class:`~attnlens.errors.LayoutError` (the samples discarded) when the store's
        samples have more steps than ``run``.
        """
        streams = self.streams.pop(run, None)
        if streams is None:
            return False
        counted = len(run.steps)
        if any(stream.sizes["step"] != counted for stream in streams):
            for stream in streams:
                stream.discard()
            run.steps, run.stored = [], True  # given up: never submitted
            raise LayoutError(
                f"the store {self.writer.url} holds 'full' over {streams[0].sizes['step']} step(s) per "
                f"sample, but this sample ended after {counted} step(s): a store holds samples of one "
                "step count; write this sample to another store"
            )
        return True

    def _reserve_full(self, layout: Any) -> None:
        pass  # the store's disk is the limit: each stream checks its free space

    def _place(
        self, run: Run, steps: list[tuple[CapturedStep, torch.Tensor | None]]
    ) -> list[tuple[Any, int]]:
        """Streams begun or grown for the forward's steps; each forward row's (stream, step index)."""
        count = len(run.steps)
        streams = self.streams.get(run)
        if streams is None:
            layout, (heads, reduction) = run.layout, self.spec.select_heads(self.layers[0].num_heads)
            sizes = {
                "step": count,
                "layer": len(self.layers),
                "head": 1 if reduction else len(heads) if heads is not None else self.layers[0].num_heads,
                "query_all": layout.seq_len,
                "key": layout.seq_len,
            }
            streams = self.streams[run] = []
            for i in range(layout.batch):
                sample_id = run.ids[i] if run.ids is not None else None
                streams.append(
                    self.writer.stream(
                        sample_id, "full", sizes, _numpy_dtype(self.spec.dtype), growing="step"
                    )
                )
        for stream in streams:
            stream.grow(count)
        first = count - len(steps)
        targets: dict[int, tuple[Any, int]] = {}
        for k, (_, rows) in enumerate(steps):
            forward_rows = range(len(streams)) if rows is None else rows.tolist()
            for sample, row in enumerate(forward_rows):
                targets[row] = (streams[sample], first + k)
        return [targets[row] for row in sorted(targets)]

    def _bands_of(self, layer: str, row: int, heads: int, n: int, whole: bool) -> _Bands:
        bands = self._bands.get((layer, row))
        if bands is None:
            stream, step = self._targets[row]
            dtype = _numpy_dtype(self.spec.dtype)
            bands = _Bands(stream, step, self._layer_index[layer], heads, n, dtype, whole)
            self._bands[(layer, row)] = bands
        return bands


class _StoreSink:
    """A :class:`~attnlens.probs.FullSink` over some forward rows, each gathered by its :class:`_Bands`."""

    def __init__(self, bands: list[_Bands], dtype: torch.dtype) -> None:
        self.bands = bands
        self.dtype = dtype

    def write(self, rows: slice | torch.Tensor, cols: slice | torch.Tensor, values: torch.Tensor) -> None:
        """``values`` ``(batch, head, len(rows), len(cols))``, converted as the in-memory sink keeps them."""
        values = values.to(dtype=self.dtype)
        if values.dtype == torch.bfloat16:  # numpy has no bfloat16: kept as float32, as in memory
            values = values.float()
        host = values.cpu().numpy()
        at = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows.cpu().numpy()
        where = cols if isinstance(cols, slice) else cols.cpu().numpy()
        for bands, part in zip(self.bands, host, strict=True):
            bands.put(at, where, part)


class _Bands:
    """One layer of one sample at one step: query rows gathered into whole store chunks, then written.

    A band covers one chunk of ``query_all`` rows, ``(head, rows, key)``, held as one array per
    chunk of heads so that each is queued (and freed) on its own. A band is written when all its
    rows have come; :meth:`finish` writes the rest (NaN where no call wrote).
    """

    def __init__(self, stream: Any, step: int, layer: int, heads: int, n: int, dtype: np.dtype, whole: bool):
        self.stream, self.step, self.layer = stream, step, layer
        self.heads, self.n, self.dtype, self.whole = heads, n, dtype, whole
        self.rows, self.head_block = stream.chunks["query_all"], stream.chunks["head"]
        self.open: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}
        self.written = np.zeros(math.ceil(n / self.rows), dtype=bool)

    def put(self, rows: np.ndarray, cols: slice | np.ndarray, values: np.ndarray) -> None:
        """``values`` ``(head, len(rows), len(cols))`` of the sample's rows ``rows`` and columns ``cols``.

        Whole rows that make whole store chunks are queued as they are, without a copy.
        """
        start, stop = int(rows[0]), int(rows[-1]) + 1
        first, last = start // self.rows, math.ceil(stop / self.rows)
        if (
            isinstance(cols, slice)
            and cols == slice(None)
            and start % self.rows == 0
            and (stop % self.rows == 0 or stop == self.n)
            and stop - start == len(rows)
            and bool((np.diff(rows) == 1).all())
            and not any(b in self.open for b in range(first, last))
            and not self.written[first:last].any()
        ):
            for h in range(0, self.heads, self.head_block):
                part = values[h : h + self.head_block]
                heads = slice(h, h + len(part))
                self.stream.write(
                    part, step=self.step, layer=self.layer, head=heads, query_all=slice(start, stop)
                )
            self.written[first:last] = True
            return
        blocks = rows // self.rows
        for b in np.unique(blocks):
            picked = blocks == b
            local = rows[picked] - b * self.rows
            parts, filled = self._band(int(b))
            if filled[local].any():
                raise LayoutError(f"two attention calls wrote the same rows of 'full' in layer {self.layer}")
            filled[local] = True
            part_values = values if picked.all() else values[:, picked]
            contiguous = len(local) == local[-1] - local[0] + 1
            target = slice(int(local[0]), int(local[-1]) + 1) if contiguous else local
            for g, part in enumerate(parts):
                chunk = part_values[g * self.head_block : (g + 1) * self.head_block]
                if isinstance(cols, slice):
                    part[:, target, cols] = chunk
                else:
                    part[:, np.asarray(local)[:, None], cols[None, :]] = chunk
            if filled.all():
                self._flush(int(b))

    def finish(self) -> None:
        """Write every band not yet written; rows that no call wrote are NaN."""
        for b in range(len(self.written)):
            if not self.written[b]:
                parts, filled = self._band(b, nan=True)
                for part in parts:
                    part[:, ~filled] = np.nan
                self._flush(b)

    def _band(self, b: int, nan: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
        if b not in self.open:
            rows = min(self.n, (b + 1) * self.rows) - b * self.rows
            make = np.empty if self.whole and not nan else functools.partial(np.full, fill_value=np.nan)
            parts = [
                make((min(self.head_block, self.heads - h), rows, self.n), dtype=self.dtype)
                for h in range(0, self.heads, self.head_block)
            ]
            self.open[b] = (parts, np.zeros(rows, dtype=bool))
        return self.open[b]

    def _flush(self, b: int) -> None:
        parts, _ = self.open.pop(b)
        start = b * self.rows
        for g, part in enumerate(parts):
            heads = slice(g * self.head_block, g * self.head_block + len(part))
            rows = slice(start, start + part.shape[1])
            self.stream.write(part, step=self.step, layer=self.layer, head=heads, query_all=rows)
        self.written[b] = True


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a kept tensor of ``dtype`` becomes (bfloat16: float32)."""
    return np.dtype(np.float32) if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype
