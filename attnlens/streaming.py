"""``full`` streamed to a store as it is computed: the recorder of ``capture(keep="full", store=...)``.

Private to :class:`attnlens.Capture`. Each sample of a run gets its own
:class:`~attnlens.store.SampleStream`; each attention call's chunks of query rows are gathered
into whole store chunks and queued to the writer thread, so that a sample's ``full`` never
exists whole in memory.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from .errors import LayoutError
from .grouping import Run
from .recorder import Recorder
from .schema import CapturedStep

__all__ = ["StreamingRecorder"]


class StreamingRecorder(Recorder):
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
