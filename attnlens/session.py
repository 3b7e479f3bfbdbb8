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
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import xarray as xr

from .capture import CaptureSpec, attention_slices
from .errors import CaptureTooLargeError, EmptySpecError, HookError, LayoutError
from .hooks import HookRegistry
from .interventions import Intervener, Intervention, capture_mask, redirected_slices
from .models.base import AttentionLayer, CallLayout
from .models.registry import resolve
from .schema import CapturedStep, SampleGroup, assemble, config_hash
from .text import TokenLabels

__all__ = ["Capture", "capture"]


@dataclass
class _Run:
    """Forwards that belong together: one pass of a sampler (or one bare call) over a batch."""

    layout: CallLayout
    labels: list[TokenLabels]
    prompts: list[str]
    steps: list[CapturedStep] = field(default_factory=list)
    seen: set[tuple[float, str]] = field(default_factory=set)
    last_timestep: float = float("inf")
    denoise_step: int = -1
    ids: list[str] | None = None  # named by `with cap.sample(...)`, which also stores the run
    stored: bool = False  # handed to the store writer
    direction: int = 0  # sign of the timestep's change along the run, once it has moved


class Capture:
    """A capture session over one model; see :func:`capture`.

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
        self.adapter, self.transformer, self.pipeline = resolve(model)
        self.spec = spec
        refused = [k for k in spec.keep if k in self.adapter.unsupported_keeps]
        if refused:
            raise EmptySpecError(
                f"the {self.adapter.family} adapter cannot keep {refused}; "
                f"choose from {[k for k in spec.keep if k not in refused] or 'cross, key_mass'}"
            )
        every = self.adapter.layers(self.transformer)
        chosen = set(spec.select_layers([layer.name for layer in every]))
        self.layers: list[AttentionLayer] = [layer for layer in every if layer.name in chosen]
        heads = {layer.num_heads for layer in self.layers}
        for n in heads:
            spec.select_heads(n)  # raises early on a bad head index
        self._user_labels = list(labels) if labels is not None else None
        self._runs: list[_Run] = []
        self._step: CapturedStep | None = None
        # every step of the running forward, with the batch rows it keeps (None = all rows)
        self._steps: list[tuple[CapturedStep, torch.Tensor | None]] = []
        self._pending_text: dict[str, list[torch.Tensor]] = {}
        self._pending_prompts: list[str] = []
        self._full_bytes = 0
        self._new_sample = False
        self._result: xr.Dataset | None = None
        self._open_ids: list[str] | None = None  # the ids of the running `with cap.sample(...)` block
        self._writer = None
        if store is not None:
            from .store import StoreWriter

            if isinstance(store, StoreWriter):  # a writer configured by hand (compression, queue size)
                if sample_ids is not None or storage_options is not None:
                    raise TypeError("give sample_ids and storage_options to the StoreWriter itself")
                self._writer = store
            else:
                self._writer = StoreWriter(store, sample_ids=sample_ids, storage_options=storage_options)
        elif sample_ids is not None:
            raise TypeError("sample_ids name the samples of a store: give store= as well")
        self._kept = {layer.name for layer in self.layers}
        self._intervener: Intervener | None = None
        hooked = self.layers
        if intervene is not None:
            members = self.adapter.transformers(self.transformer, self.pipeline)
            if self.adapter.intercept_sdpa or len(members) > 1:
                raise HookError(
                    f"interventions are not supported for the {self.adapter.family} adapter yet: they "
                    "replace a dispatch-function call over the joint sequence of one transformer (FLUX, …)"
                )
            acted = set(intervene.select_layers([layer.name for layer in every]))
            self._intervener = Intervener(intervene, acted)
            hooked = [layer for layer in every if layer.name in acted or layer.name in self._kept]
        self._registry = HookRegistry(
            self.adapter,
            self.transformer,
            hooked,
            self,
            pipeline=self.pipeline,
            hidden_states="hidden_norm" in spec.keep,
        )
        # the forward being captured (all its rows) and the rows that per-row calls filled so far
        self._layout: CallLayout | None = None
        self._partial: dict[tuple[str, str], torch.Tensor] = {}
        # pipelines that switch transformers between steps (Wan 2.2) hook each one; layers share names
        members = self.adapter.transformers(self.transformer, self.pipeline)
        self._members = {name: module for name, module in members}
        self._extra = [
            HookRegistry(
                self.adapter,
                module,
                _member_layers(self.adapter, module, name, self.layers),
                _Member(self, name),
                hidden_states="hidden_norm" in spec.keep,
            )
            for name, module in members[1:]
        ]

    # -- context management ----------------------------------------------------------------

    def __enter__(self) -> Capture:
        self._registry.attach()
        try:
            for registry in self._extra:
                registry.attach()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._registry.detach()
        for registry in self._extra:
            registry.detach()
        self._partial = {}
        self._step = None
        self._steps = []
        if self._writer is not None:
            finished = bool(exc) and exc[0] is None  # after an exception the last sample is unfinished
            if finished:
                self._store_finished_run()
            self._writer.close(raise_errors=finished)

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return self._registry.attached

    def next_sample(self) -> None:
        """Start a new sample at the next forward, even if its timestep would continue a run."""
        self._new_sample = True

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
        >>> list(attnlens.open_store("memory://doc/ids.zarr").sample_id.values)
        ['cat', 'dog']
        """
        names = [str(i) for i in ids]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"give one distinct id per sample of the batch; got {names}")
        if self._open_ids is not None:
            raise HookError("`with cap.sample(...)` blocks cannot nest")
        if self._writer is not None:
            self._writer.check_ids(names)
        first = len(self._runs)
        self._open_ids, self._new_sample = names, True
        try:
            yield
        finally:
            self._open_ids, self._new_sample = None, True
        runs = [r for r in self._runs[first:] if r.steps]
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
            from .errors import StoreError

            raise StoreError("this capture writes no store: give store= to attnlens.capture")
        return self._writer.pending(ids)

    @property
    def result(self) -> xr.Dataset:
        """Everything captured so far, as an in-memory ``xarray.Dataset`` (see :mod:`attnlens.schema`)."""
        if self._result is None:
            self._result = self._assemble()
        return self._result

    # -- Listener --------------------------------------------------------------------------

    def begin_forward(
        self, args: tuple, kwargs: dict[str, Any], branch: str, source: str = "transformer"
    ) -> bool:
        layout = self.adapter.layout(self._members.get(source, self.transformer), args, kwargs)
        self._layout = layout
        run = self._runs[-1] if self._runs else None
        groups = _branch_groups(self.adapter.branches(self.pipeline, layout, kwargs), branch, layout.batch)
        sequential = self.adapter.sequential_branches if self.pipeline is not None else ()
        if len(groups) == 1 and sequential and run and (layout.timestep, branch) in run.seen:
            # CFG as consecutive calls without cache_context: the k-th call at a timestep is branch k
            free = [b for b in sequential if (layout.timestep, b) not in run.seen]
            if free and layout.timestep == run.last_timestep:
                groups = [(free[0], None)]
        samples = layout.batch // len(groups)
        per_sample = _rows_of(layout, groups[0][1], samples)
        keys = [(layout.timestep, name) for name, _ in groups]
        if (
            run is not None
            and not self._new_sample
            and layout.timestep == run.last_timestep
            and not any(key in run.seen for key in keys)
            and not run.layout.same_tokens(layout)
        ):
            # another branch of the same step over other tokens (Qwen-Image's negative prompt is
            # shorter): one Dataset holds one token layout, so the first branch's steps are kept
            warnings.warn(
                f"the {', '.join(name for name, _ in groups)} forwards see "
                f"{len(layout.text)} text tokens, the {run.steps[0].branch if run.steps else 'first'} ones "
                f"{len(run.layout.text)}: it is not captured (a Dataset holds one token layout); give the "
                "negative prompt the same token count to capture both",
                stacklevel=2,
            )
            self._step, self._steps = None, []
            return self._intervener is not None
        if (
            run is None
            or self._new_sample
            or run.layout.batch != samples
            or not run.layout.same_tokens(layout)
            or self._restarted(run, layout.timestep)
            or any(key in run.seen for key in keys)
        ):
            run = self._start_run(per_sample)
        if layout.timestep != run.last_timestep:
            if run.denoise_step >= 0 and not run.direction:
                run.direction = 1 if layout.timestep > run.last_timestep else -1
            run.denoise_step += 1
            run.last_timestep = layout.timestep
        run.seen.update(keys)
        if not self.spec.wants_step(run.denoise_step, layout.timestep):
            self._step, self._steps = None, []
            return self._intervener is not None  # an intervention acts on every forward, kept or not
        if "full" in self.spec.keep:
            self._reserve_full(layout)
        self._steps = []
        for name, rows in groups:
            step = CapturedStep(run.denoise_step, layout.timestep, name, {}, transformer=source)
            run.steps.append(step)
            self._steps.append((step, rows))
        self._step = self._steps[0][0]
        self._result = None
        return True

    def end_forward(self) -> None:
        for (var, name), tensor in self._partial.items():
            self._keep(var, name, tensor)
        self._partial = {}
        for step, _ in self._steps:
            _fill_skipped(step, [layer.name for layer in self.layers])
        self._step = None
        self._steps = []

    def attention(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        attn_mask: torch.Tensor | None,
        scale: float | None,
        call: int = 0,
    ) -> None:
        plan = self._intervener.take(layer.name) if self._intervener is not None else None
        keeps = self.spec.attention_keeps
        if self._step is None or not keeps or self._layout is None or layer.name not in self._kept:
            return
        rows = self.adapter.call_rows(layer, self._layout, call)
        if rows is None:
            return
        layout, row_index = self._runs[-1].layout, None
        if rows != slice(None):  # the call holds some rows of the forward (Mochi: one row per call)
            row_index = torch.arange(self._layout.batch)[rows]
            layout = _rows_of(self._layout, row_index, len(row_index))
        heads, reduction = self.spec.select_heads(layer.num_heads)
        redirected = plan is not None and plan.onto is not None
        if plan is not None and not redirected:  # keep what the model attended to: exact zero columns
            attn_mask = capture_mask(plan, attn_mask)
        sub = self.adapter.call_tokens(layer, layout, query.shape[1], key.shape[1])
        if sub is None:
            out = attention_slices(
                query,
                key,
                text=layout.text,
                image=layout.image,
                keep=keeps,
                scale=scale,
                attn_mask=attn_mask,
                heads=heads,
                reduction=None if redirected else reduction,
                chunk_bytes=self.spec.chunk_bytes,
            )
            if redirected:
                out = redirected_slices(
                    out, plan, text=layout.text, image=layout.image, heads=heads, reduction=reduction
                )
        else:
            n_heads = 1 if reduction else len(heads) if heads is not None else query.shape[2]
            out = _partial_slices(
                query, key, sub, layout, keeps, n_heads, scale, attn_mask, heads, reduction, self.spec
            )
        for var, tensor in out.items():
            if row_index is None:
                self._keep(var, layer.name, tensor)
                continue
            whole = self._partial.get((var, layer.name))
            if whole is None:
                whole = tensor.new_full((self._layout.batch, *tensor.shape[1:]), float("nan"))
                self._partial[(var, layer.name)] = whole
            whole[row_index.to(whole.device)] = tensor

    def block_output(self, layer: AttentionLayer, output: Any) -> None:
        if self._step is not None and layer.name in self._kept:
            norms = self.adapter.block_hidden(output).float().norm(dim=-1)
            layout = self._runs[-1].layout
            if norms.shape[1] != layout.seq_len:  # a block without text output: its image stream alone
                joint = norms.new_full((norms.shape[0], layout.seq_len), float("nan"))
                joint[:, layout.image.to(norms.device)] = norms
                norms = joint
            self._keep("hidden_norm", layer.name, norms)

    def text_ids(self, input_ids: torch.Tensor, source: str = "text") -> None:
        self._pending_text.setdefault(source, []).append(input_ids)

    def intervene(
        self, layer: AttentionLayer, call_args: dict[str, Any], call: int = 0
    ) -> torch.Tensor | None:
        """The output of an attention call under this capture's intervention; ``None`` runs the original."""
        if self._intervener is None or self._layout is None or not self._runs:
            return None
        if self.adapter.call_rows(layer, self._layout, call) != slice(None):
            return None  # not the layer's joint attention over every row (an IP-adapter call)
        labels = self._runs[-1].labels
        return self._intervener.output(layer.name, call_args, self._layout, labels, self.spec.chunk_bytes)

    def prompt_text(self, prompts: list[str]) -> None:
        """The prompt strings a pipeline's ``encode_prompt`` received (the first call is the prompt)."""
        if not self._pending_prompts:
            self._pending_prompts = list(prompts)

    # -- internals -------------------------------------------------------------------------

    def _keep(self, var: str, layer: str, tensor: torch.Tensor) -> None:
        tensor = tensor.to(device=self.spec.device, dtype=self.spec.dtype, non_blocking=True)
        assert self._step is not None
        for step, rows in self._steps or [(self._step, None)]:
            kept = tensor if rows is None else tensor.index_select(0, rows.to(tensor.device))
            step.arrays.setdefault(var, {})[layer] = kept

    def _restarted(self, run: _Run, timestep: float) -> bool:
        """Whether ``timestep`` cannot continue ``run``: it moves against the sampler's direction."""
        if not self.adapter.timesteps_may_rise:
            return timestep > run.last_timestep
        if run.denoise_step < 0 or not run.direction or timestep == run.last_timestep:
            return False
        return (timestep > run.last_timestep) != (run.direction > 0)

    def _start_run(self, layout: CallLayout) -> _Run:
        if self._writer is not None:
            self._store_before_run()
        self._new_sample = False
        labels, prompts = self._labels_for(layout)
        run = _Run(layout=layout, labels=labels, prompts=prompts, ids=self._open_ids)
        self._runs.append(run)
        return run

    def _store_before_run(self) -> None:
        if self._writer.declared and self._open_ids is None:
            from .errors import StoreError

            raise StoreError(
                f"{self._writer.url} declares its sample_ids: capture each sample inside "
                "`with cap.sample(id):`"
            )
        self._store_finished_run()

    def _store_finished_run(self) -> None:
        """Hand the last run to the store unless it is empty, stored or named (cap.sample stores those)."""
        run = self._runs[-1] if self._runs else None
        if run is not None and run.ids is None and not run.stored and run.steps:
            self._submit(run, None)

    def _submit(self, run: _Run, ids: list[str] | None) -> None:
        run.stored = True
        copied = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            copied = torch.cuda.Event()  # the writer thread must not read host buffers still being filled
            copied.record()

        def build() -> xr.Dataset:
            if copied is not None:
                copied.synchronize()
            return self._assemble([run])

        self._writer.submit(ids, build)

    def _labels_for(self, layout: CallLayout) -> tuple[list[TokenLabels], list[str]]:
        n_text, batch = len(layout.text), layout.batch
        if self._user_labels is not None:
            labels = self._user_labels
            if len(labels) == 1:
                labels = labels * batch
            if len(labels) != batch or any(len(lab) != n_text for lab in labels):
                raise LayoutError(
                    f"labels describe {len(labels)} samples of {[len(lab) for lab in labels]} tokens, "
                    f"but the forward has {batch} samples of {n_text} text tokens"
                )
            return list(labels), [""] * batch
        pending, self._pending_text = self._pending_text, {}
        prompts, self._pending_prompts = self._pending_prompts, []
        found = None
        if self.pipeline is not None and pending:
            found = self.adapter.text_labels(self.pipeline, pending, prompts, layout)
        if found is None or len(found) != batch or any(len(lab) != n_text for lab in found):
            return [_unknown(n_text, layout, i) for i in range(batch)], [""] * batch
        if prompts and batch % len(prompts) == 0:
            texts = [prompts[i // (batch // len(prompts))] for i in range(batch)]
        else:
            texts = [_joined_words(lab) for lab in found]
        return list(found), texts

    def _reserve_full(self, layout: CallLayout) -> None:
        heads, reduction = self.spec.select_heads(self.layers[0].num_heads)
        n_heads = 1 if reduction else len(heads) if heads else self.layers[0].num_heads
        itemsize = torch.empty((), dtype=self.spec.dtype).element_size()
        need = layout.batch * n_heads * layout.seq_len**2 * itemsize * len(self.layers)
        if self._full_bytes + need > self.spec.max_full_bytes:
            raise CaptureTooLargeError(
                f"keeping 'full' for this forward needs {need / 2**20:.1f} MiB ({layout.batch} samples × "
                f"{n_heads} heads × {layout.seq_len}² tokens × {len(self.layers)} layers), which would bring "
                f"the capture to {(self._full_bytes + need) / 2**20:.1f} MiB, above max_full_bytes="
                f"{self.spec.max_full_bytes / 2**20:.1f} MiB; select fewer layers/heads/steps, reduce heads "
                "with heads='mean', or raise max_full_bytes"
            )
        self._full_bytes += need

    def _assemble(self, runs: list[_Run] | None = None) -> xr.Dataset:
        runs = [r for r in (self._runs if runs is None else runs) if r.steps]
        if not runs:
            raise HookError("nothing was captured: run the model inside a `with attnlens.capture(...)` block")
        if torch.cuda.is_initialized():
            # kept tensors were copied to the host asynchronously (``_keep``): wait before reading them
            torch.cuda.synchronize()
        first = runs[0].layout
        for run in runs[1:]:
            if not run.layout.same_tokens(first):
                raise LayoutError(
                    f"samples differ in token layout ({first.seq_len} vs {run.layout.seq_len} tokens, or "
                    "another image grid) and cannot share one Dataset: capture them separately"
                )
        groups = [
            SampleGroup(
                steps=[
                    CapturedStep(
                        s.denoise_step,
                        s.timestep,
                        s.branch,
                        {v: {k: _numpy(t) for k, t in per.items()} for v, per in s.arrays.items()},
                        transformer=s.transformer,
                    )
                    for s in run.steps
                ],
                labels=run.labels,
                prompts=run.prompts,
            )
            for run in runs
        ]
        layer_heads = self.layers[0].num_heads
        config = dict(getattr(self.transformer, "config", {}) or {})
        attrs = {
            "model_class": type(self.transformer).__name__,
            "model_id": str(config.get("_name_or_path", "")),
            "family": self.adapter.family,
            "config_hash": config_hash(config),
            "capture_spec": _describe(self.spec),
            "versions": _versions(),
            **self.adapter.dataset_attrs(self.transformer),
            **({"intervention": self._intervener.intervention.describe()} if self._intervener else {}),
        }
        return assemble(
            groups,
            layers=[layer.name for layer in self.layers],
            layer_kinds=[layer.kind for layer in self.layers],
            heads=self.spec.head_labels(layer_heads),
            grid=first.grid,
            n_text=len(first.text),
            seq_len=first.seq_len,
            text_positions=first.text.numpy(),
            attrs=attrs,
        )


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
    body raises. The model's outputs are unchanged, unless ``intervene`` changes its attention.

    Args:
        model: a supported pipeline (e.g. ``FluxPipeline``) or transformer
            (e.g. ``FluxTransformer2DModel``); see :func:`attnlens.supported_models`.
        spec: a :class:`CaptureSpec`; or give its fields as keywords instead.
        labels: token labels per sample (or one for all) when calling a bare transformer;
            pipelines are labelled from their own tokenizer.
        store: a path, fsspec URL or zarr store to stream each finished sample to (see
            :mod:`attnlens.store`), or a :class:`~attnlens.store.StoreWriter` configured by
            hand; ``cap.result`` still holds everything in memory.
        sample_ids: every sample id the store will hold, the same list in every process that
            writes to it (e.g. each ``torchrun`` rank); capture each inside
            ``with cap.sample(id):`` and resume with ``cap.pending()``. ``None``: the store
            grows with each finished sample.
        storage_options: passed to fsspec for a store URL.
        intervene: :func:`attnlens.suppress` or :func:`attnlens.redirect`: the model attends
            with the selected keys' attention removed or moved, in every forward while the
            capture is attached (captured steps or not), and what is kept is that attention;
            outputs change, by design (see :mod:`attnlens.interventions`).

    Returns:
        a :class:`Capture`; after the block, ``cap.result`` is an ``xarray.Dataset``.

    Forwards are grouped into samples automatically: a forward starts a new sample when its
    timestep is higher than the last one's (a sampler restarted), when the same timestep and
    branch come again (repeated bare calls), or when the batch or token layout changes;
    :meth:`Capture.next_sample` forces one. Each row of a batch is a sample.
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


def _branch_groups(
    rows: tuple[str, ...] | None, branch: str, batch: int
) -> list[tuple[str, torch.Tensor | None]]:
    """Split a forward's batch rows by CFG branch: ``[(branch, rows or None for all)]``, cond first."""
    if rows is None or len(set(rows)) == 1:
        return [(rows[0] if rows else branch, None)]
    if len(rows) != batch:
        raise LayoutError(f"an adapter labelled {len(rows)} rows of a batch of {batch}")
    names = sorted(dict.fromkeys(rows), key=lambda name: name != "cond")
    groups = [(name, torch.tensor([i for i, r in enumerate(rows) if r == name])) for name in names]
    if len({len(g[1]) for g in groups}) != 1:
        raise LayoutError(f"CFG branches {names} hold different numbers of rows: {list(rows)}")
    return groups


def _rows_of(layout: CallLayout, rows: torch.Tensor | None, samples: int) -> CallLayout:
    """The layout of one branch's rows (``samples`` of them) of a forward."""
    if rows is None:
        return layout
    mask = layout.text_mask
    if mask is not None:
        mask = mask.index_select(0, rows.to(mask.device))
    return replace(layout, batch=samples, text_mask=mask)


class _Member:
    """Listener of a pipeline's further transformer (Wan 2.2's ``transformer_2``): reports under its name."""

    def __init__(self, capture: Capture, name: str) -> None:
        self.capture = capture
        self.name = name

    def begin_forward(self, args: tuple, kwargs: dict[str, Any], branch: str) -> bool:
        return self.capture.begin_forward(args, kwargs, branch, source=self.name)

    def end_forward(self) -> None:
        self.capture.end_forward()

    def attention(self, layer: AttentionLayer, *args: Any, **kwargs: Any) -> None:
        self.capture.attention(layer, *args, **kwargs)

    def block_output(self, layer: AttentionLayer, output: Any) -> None:
        self.capture.block_output(layer, output)

    def text_ids(self, input_ids: torch.Tensor, source: str = "text") -> None:
        self.capture.text_ids(input_ids, source)


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


def _fill_skipped(step: CapturedStep, layers: list[str]) -> None:
    """NaN for the layers a forward skipped (SD3's skip-layer guidance), shaped like the layers it ran."""
    for per_layer in step.arrays.values():
        template = next(iter(per_layer.values()), None)
        for name in layers:
            if template is not None and name not in per_layer:
                per_layer[name] = torch.full_like(template, float("nan"))


def _joined_words(labels: TokenLabels) -> str:
    """The words of a sample's labels, once each, in prompt order."""
    words = {int(i): w for i, w in zip(labels.word_index, labels.word, strict=True) if i >= 0}
    return " ".join(words[i] for i in sorted(words))


def _unknown(n_text: int, layout: CallLayout, row: int) -> TokenLabels:
    """Labels of text positions whose tokens were never seen; masked-out positions are padding."""
    labels = TokenLabels.unknown(n_text)
    if layout.text_mask is not None and row < layout.text_mask.shape[0]:
        labels.token_kind[~layout.text_mask[row].cpu().numpy().astype(bool)] = "pad"
    return labels


def _partial_slices(
    query: torch.Tensor,
    key: torch.Tensor,
    positions: tuple[torch.Tensor, torch.Tensor],
    layout: CallLayout,
    keep: Sequence[str],
    n_heads: int,
    scale: float | None,
    attn_mask: torch.Tensor | None,
    heads: list[int] | None,
    reduction: str | None,
    spec: CaptureSpec,
) -> dict[str, torch.Tensor]:
    """:func:`attention_slices` of a call over part of the joint sequence, placed into joint-size arrays.

    ``positions`` are the joint positions of the call's queries and keys; what the call does
    not cover is NaN (an image-only layer has no image → text probabilities).
    """
    q_pos, k_pos = (p.to(torch.long).cpu() for p in positions)
    n_text, n_image, seq = len(layout.text), len(layout.image), layout.seq_len
    if len(q_pos) != query.shape[1] or len(k_pos) != key.shape[1]:  # the adapter could not place the call
        q_pos = k_pos = torch.empty(0, dtype=torch.long)
        query, key = query[:, :0], key[:, :0]
    text_at = torch.full((seq,), -1, dtype=torch.long)
    text_at[layout.text] = torch.arange(n_text)
    image_at = torch.full((seq,), -1, dtype=torch.long)
    image_at[layout.image] = torch.arange(n_image)
    q_txt, q_img = (text_at[q_pos] >= 0).nonzero().flatten(), (image_at[q_pos] >= 0).nonzero().flatten()
    k_txt, k_img = (text_at[k_pos] >= 0).nonzero().flatten(), (image_at[k_pos] >= 0).nonzero().flatten()
    out = attention_slices(
        query,
        key,
        text=q_txt,
        image=q_img,
        key_text=k_txt,
        key_image=k_img,
        keep=keep,
        scale=scale,
        attn_mask=attn_mask,
        heads=heads,
        reduction=reduction,
        chunk_bytes=spec.chunk_bytes,
    )
    batch = query.shape[0]
    placed: dict[str, torch.Tensor] = {}
    targets = {  # variable: (joint shape, joint rows, joint columns)
        "cross": ((n_image, n_text), image_at[q_pos[q_img]], text_at[k_pos[k_txt]]),
        "text_to_image": ((n_text, n_image), text_at[q_pos[q_txt]], image_at[k_pos[k_img]]),
        "full": ((seq, seq), q_pos, k_pos),
    }
    for var in keep:
        if var == "key_mass":
            full = torch.full((batch, n_heads, seq), float("nan"), device=query.device)
            if "key_mass" in out:
                full[:, :, k_pos.to(query.device)] = out["key_mass"]
            placed[var] = full
            continue
        shape, rows, cols = targets[var]
        full = torch.full((batch, n_heads, *shape), float("nan"), device=query.device)
        if var in out and len(rows) and len(cols):
            rows, cols = rows.to(query.device), cols.to(query.device)
            full[:, :, rows[:, None], cols[None, :]] = out[var]
        placed[var] = full
    return placed


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()


def _describe(spec: CaptureSpec) -> dict[str, Any]:
    def plain(value: Any) -> Any:  # JSON-able, so that a store can keep the spec as an attribute
        if value is None or isinstance(value, str | int):
            return value
        return repr(value) if callable(value) else list(value)

    return {
        "layers": plain(spec.layers),
        "heads": plain(spec.heads),
        "timesteps": plain(spec.timesteps),
        "keep": list(spec.keep),
        "dtype": str(spec.dtype).removeprefix("torch."),
    }


def _versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    return {"attnlens": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__}
