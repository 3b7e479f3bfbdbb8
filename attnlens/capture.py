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
from .spec import CaptureSpec
from .streaming import StreamingRecorder
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
        self._recorder = (StreamingRecorder if streaming else Recorder)(
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
        if isinstance(self._recorder, StreamingRecorder):
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
        streamed = isinstance(recorder, StreamingRecorder) and recorder.close_streams(run)
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
